"""The Gradio demo (``align demo``)."""
