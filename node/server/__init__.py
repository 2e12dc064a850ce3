"""The HTTP server: app assembly, the guards every API shares, and `serve`'s lifecycle."""
