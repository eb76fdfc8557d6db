"""The browser chat (Gradio Blocks) on top of an engine: `ui.layout.build_demo(engine)`.

No module here imports torch: the engine owns the device."""
