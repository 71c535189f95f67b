"""The Gradio chat demo for vision-language adapters: `python -m demo` or `vlm demo`.

`demo.app.launch()` serves it; `demo.app.build_app(model)` builds the UI around a loaded model.
"""
