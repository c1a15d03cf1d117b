"""Using what was trained: opening it (`inference`), `qwentune chat`, GGUF export and its check (`gguf_export`,
`gguf_verify`, `modelfile`), `qwentune push` (`hub`) and `qwentune serve`: an existing OpenAI-compatible server
(transformers serve, llama.cpp, vLLM) for it (`servers`).
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "chat": ("Conversation", "Generator", "Reply", "parse_reply", "run_chat"),
        "gguf_export": ("export_gguf",),
        "hub": ("check_repo_id", "push", "push_after_training", "require_token"),
        "inference": ("is_run_dir", "load_for_inference", "resolve_trained"),
        "servers": (
            "BACKENDS",
            "DEFAULT_PORT",
            "RunningServer",
            "ServerPlan",
            "free_port",
            "plan_server",
            "serve",
            "start_server",
        ),
    },
)
