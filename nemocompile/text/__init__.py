"""Text in and out: the tokenizer, chat templates, prompt files and request checks every front door shares."""
