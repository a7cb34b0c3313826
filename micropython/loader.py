# The boot loader of the board agent: the one piece OTA never replaces (with main.py and board.py).
# It reads state/boot.json and decides which app/ runs:
#   pending    a verified release waits in app.new: swap it in (app -> app.old, app.new -> app), trial
#   trial      first boot of the new release: run it; it must connect and commit within its deadline.
#              A second boot still in trial means it did not (crash, hang, reset): roll back.
# Each step is a rename followed by a write-ahead state change, so a power cut between any two of
# them is finished on the next boot. It imports nothing from app/ before deciding.
import os
import sys
import json

BOOT = "state/boot.json"


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _rm(p):
    if not _exists(p):
        return
    if os.stat(p)[0] & 0x4000:
        for n in os.listdir(p):
            _rm(p + "/" + n)
        os.rmdir(p)
    else:
        os.remove(p)


def _save(board, st):
    if not _exists("state"):
        os.mkdir("state")
    with open(BOOT + ".tmp", "w") as f:
        f.write(json.dumps(st))
    try:
        os.rename(BOOT + ".tmp", BOOT)
    except OSError:
        os.remove(BOOT)
        os.rename(BOOT + ".tmp", BOOT)
    board.sync()


def _load():
    for p in (BOOT, BOOT + ".tmp"):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    return {}


def decide(board):
    """Finish whatever swap or rollback the last boot left; returns the boot state the app sees."""
    st = _load()
    s = st.get("state")
    if s == "pending":
        if _exists("app.new"):
            if _exists("app"):
                _rm("app.old")
                os.rename("app", "app.old")
                board.cut("loader.mid_swap")
            os.rename("app.new", "app")
            board.sync()
        st["state"], st["boots"] = "trial", 0
        _save(board, st)
        s = "trial"
    if s == "trial":
        if st.get("boots", 0) >= 1 and (_exists("app.old") or _exists("app.broken")):
            if _exists("app.old"):
                if _exists("app"):
                    _rm("app.broken")
                    os.rename("app", "app.broken")
                    board.cut("loader.mid_rollback")
                os.rename("app.old", "app")
                board.sync()
            st["state"] = "rolledback"
            _save(board, st)
            print("loader: release", st.get("version"), "failed its self-test; rolled back to", st.get("from"))
        else:
            st["boots"] = st.get("boots", 0) + 1
            _save(board, st)
    if st.get("state") != "trial" and _exists("app.broken"):
        _rm("app.broken")
        board.sync()
    return st


class Restart(BaseException):
    """Raised by the agent when board.reset() returned (a port without machine.reset()): start over
    in-process. A BaseException, so no `except Exception` in the app carries on past it."""


APP = ("agent", "identity", "mqtt", "ota", "p256", "sntp", "store")


def reset(board, why):
    """Reset the board; never returns. Where board.reset() returns or raises (a port without
    machine.reset()), raise Restart: start() begins again in-process, and the caller never carries on
    as if the reset had happened."""
    print(why + "; resetting")
    try:
        board.reset()
    except Exception as e:
        print("reset failed:", repr(e))
    raise Restart(why)


async def start():
    import board
    if "app" not in sys.path:
        sys.path.insert(0, "app")
    while True:
        st = decide(board)
        try:
            import agent
            await agent.main(board, st)
            return
        except Restart as e:
            print("loader: restarting in-process:", e)
        except Exception as e:
            sys.print_exception(e)
            if st.get("state") != "trial":
                import asyncio
                await asyncio.sleep(10)  # a crash loop should not hammer the broker
            try:
                reset(board, "loader: the app crashed")
            except Restart:
                pass
        for n in APP:  # the next round imports the app afresh (a swap may have replaced it)
            sys.modules.pop(n, None)
