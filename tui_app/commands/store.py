"""``kvtrace ls | gc | export | rm``: the snapshot store from the shell, thin adapters over ``tracer.usecases``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tui_app.commands.options import say


def _ls(args: argparse.Namespace) -> int:
    from tracer import usecases
    from tracer.token_text import printable
    from tui_app.formatting import age, short_bytes

    folder, now = usecases.store_folder(args.store), time.time()
    entries = usecases.list_store(args.store)
    rows = [("NAME", "TOKENS", "OWN", "SHARED", "PARENT", "AGE", "LABEL")]
    for e in entries:
        if e.error:
            rows.append((e.name, "-", "-", "-", "-", "-", f"unreadable: {e.error}"))
        else:
            rows.append((e.name, f"{e.tokens:,}", short_bytes(e.own_bytes), short_bytes(e.shared_bytes),
                         e.parent or "-", age(e.saved, now), e.label))
    widths = [max(len(printable(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(printable(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + printable(row[-1]))
    say(f"{len(entries)} entries in {folder}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from tracer import usecases

    done = usecases.collect(args.store)
    print(f"removed {done.removed} unused chunk and trace block files ({done.freed:,} bytes) and "
          f"{done.temporaries} temporaries; kept {done.kept}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tracer import usecases

    say(usecases.export(args.ref, args.output, args.codec).describe())
    return 0


def _rm(args: argparse.Namespace) -> int:
    from tracer import usecases

    for ref in args.refs:
        usecases.remove(ref)
        say(f"removed {ref}; 'kvtrace gc' frees the chunks no other entry uses")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"ls": _ls, "gc": _gc, "export": _export, "rm": _rm}
