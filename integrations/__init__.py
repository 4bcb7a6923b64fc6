"""ckptd's engine side: the receiver library and the engine adapters (see PROTOCOL.md)."""
