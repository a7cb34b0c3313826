# Board entry point (MicroPython runs main.py after boot.py): hand over to the loader.
import asyncio
import loader

asyncio.run(loader.start())
