"""The two engines behind engine.base.Engine: a model on this machine (local) and an
OpenAI-compatible server (remote). Importing the package loads nothing."""
