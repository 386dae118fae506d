"""GGUF files of an export for llama.cpp and Ollama (`lvit export --gguf`), checked in llama.cpp."""
