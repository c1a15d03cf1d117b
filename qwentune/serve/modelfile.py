"""The Ollama Modelfile written beside an exported GGUF: the Qwen2.5 chat format (with tools) in Ollama's Go-template
syntax, the stop tokens, and the model's default system prompt."""

from __future__ import annotations

import re

from ..errors import QwentuneError

# Renders what Qwen2.5's Jinja template renders (system + tools block, user, assistant with content and/or
# <tool_call> blocks, tool results as <tool_response> in a user turn), as Ollama's own qwen2.5 template does; one
# difference from the Jinja: consecutive tool results get a user turn each (Go templates cannot look at the
# previous message's role).
OLLAMA_TEMPLATE = """\
{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_SYSTEM_TURN = re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the model's chat template inserts when a chat has none (None: no template or none)."""
    if not tokenizer.chat_template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    match = _SYSTEM_TURN.match(text)
    return match.group(1) if match else None


def modelfile_text(gguf_name: str, system: str | None) -> str:
    """The Modelfile for `gguf_name` (a file beside it), with `system` as the default system prompt."""
    for what, value in (("GGUF file name", gguf_name), ("system prompt", system or "")):
        if '"""' in value:
            raise QwentuneError(f'the {what} contains """, which a Modelfile cannot quote', where="export --ollama")
    lines = [
        f"# Ollama: ollama create NAME -f Modelfile (written by qwentune for {gguf_name})",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{t}"' for t in STOP_TOKENS]
    return "\n".join(lines) + "\n"
