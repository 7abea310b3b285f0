"""kbus: an accelerator emulated as an asyncio message bus."""
