"""qwentune: fine-tune Qwen models with exact chat-template masks."""
