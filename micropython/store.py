# Flash files the agent's state machines rely on: every state change is written to a temporary
# file and renamed over the old one (atomic on LittleFS and FAT's rename), then synced, so a power
# cut leaves the old or the new state, never half of one.
import json
import os


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def is_dir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def load(path, default=None):
    for p in (path, path + ".tmp"):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    return default


def write(board, path, data):
    if "/" in path:
        mkdir(path.rsplit("/", 1)[0])
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
        f.write(data)
    try:
        os.rename(tmp, path)  # atomic replace on LittleFS
    except OSError:
        os.remove(path)  # FAT cannot rename over a file; load() falls back to the complete .tmp
        os.rename(tmp, path)
    board.sync()


def save(board, path, obj):
    write(board, path, json.dumps(obj))


def remove(board, path):
    """Delete a file or a folder with what it holds; synced once, and not at all if there was nothing."""
    if exists(path):
        _rm(path)
        board.sync()


def _rm(path):
    try:
        if is_dir(path):
            for n in os.listdir(path):
                _rm(path + "/" + n)
            os.rmdir(path)
        else:
            os.remove(path)
    except OSError:
        pass


def mkdir(path):
    cur = ""
    for part in path.split("/"):
        cur = cur + "/" + part if cur else part
        if cur and not exists(cur):
            os.mkdir(cur)
