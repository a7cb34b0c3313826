# Boots a board on MicroPython's unix port, as the tests do (tests/boardkit.py):
#   MICROPYPATH=.frozen:<this folder> micropython -X heapsize=N run.py PARAMS.json
# from the board's flash folder. Parameters come in a file: the port crashes on any command-line
# argument of 256 characters or more. Then the flash's own main.py runs, as on a board.
import sys
import json

with open(sys.argv[1]) as f:
    params = json.load(f)
sys.path.insert(0, "")  # the flash's root first, as on a board
import board
import hostboard

hostboard.install(board, params)
import main  # noqa: F401  (asyncio.run(loader.start()))
