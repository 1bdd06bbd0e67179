"""``notifyrelay watch``: follow keys on a relay and show their progress, built on :mod:`notifyrelay.client`.

Three faces: live progress bars when stdout is a terminal (drawn by ``rich``), one plain line per change through a
pipe, and the relay's frames as NDJSON with ``--json``. It reconnects and resumes through relay restarts. Exit
status: 0 on Ctrl-C, or with ``--until-done`` when every followed key ended in a terminal status that is not a
failure; 1 when one failed (or no longer exists); 2 when the relay refuses the channel, a key or the token (with
the relay's sentence), or the URL is not a websocket URL (with the one meant).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, TextIO

import msgspec

from .client import Event, KeyState, Progress, RelayClient, RelayRefused, url_hint

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Finished(Exception):
    """Ends watch() with an exit status (control flow inside this module, never seen outside)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- formatting shared by the faces ---------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(progress: Progress) -> str:
    return "-" if progress.rate_per_s is None else f"{progress.rate_per_s:.1f}/s"


def _percent(progress: Progress) -> str:
    return "" if progress.percent is None else f"{progress.percent:.1f}%"


def _message(state: KeyState) -> str:
    message = (state.row or {}).get("message")
    return "" if message is None else str(message)


def _status(state: KeyState) -> str:
    progress = state.progress
    status = progress.status if progress and progress.status else (state.row or {}).get("status")
    return "" if status is None else str(status)


def describe_key(state: KeyState, payload: object = None) -> str:
    """One line for a key's state: status, done/total, percent, rate, ETA, stalled, message (or the row)."""
    progress = state.progress
    if progress is not None:
        parts = [_status(state) or "-", f"{_number(progress.done)}/{_number(progress.total or None)}"]
        if progress.percent is not None:
            parts.append(_percent(progress))
        parts += [_rate(progress), f"eta {_duration(progress.eta_s)}"]
        if progress.stalled:
            parts.append("STALLED")
        if message := _message(state):
            parts.append(msgspec.json.encode(message).decode())
        text = " ".join(parts)
    elif state.row is not None:
        text = msgspec.json.encode(state.row).decode()
    else:
        text = "changed"
    if state.state_error:
        text += f" (row not attached: {state.state_error})"
    if payload is not None:
        text += " payload=" + msgspec.json.encode(payload).decode()
    return text


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


# -- the three faces --------------------------------------------------------------------------------------------


class _Face(Protocol):
    def show(self, event: Event, client: RelayClient) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class _Lines:
    """Through a pipe: one plain line per change on stdout; connection trouble on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.connected_before = False

    def _print(self, text: str) -> None:
        print(f"{_clock()} {text}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"notifyrelay watch: {text}", file=self.err, flush=True)

    def show(self, event: Event, client: RelayClient) -> None:
        frame = event.frame
        if event.type == "welcome":
            verb = "reconnected" if self.connected_before else "connected"
            self.connected_before = True
            self._print(f"{verb}: relay {frame.get('instance') or '-'} protocol={frame.get('protocol')} "
                        f"listener={frame.get('listener')} channels={','.join(frame.get('channels', []))}")
        elif event.type == "ack":
            self._print(f"following {event.channel} keys={','.join(event.keys)}")
        elif event.type in ("notify", "snapshot") and event.channel is not None:
            table = client.state.get(event.channel, {})
            payloads: Mapping[str, Any] = frame.get("payloads") or {}
            tag = " (replay)" if frame.get("replay") else ""
            for key in event.keys:
                if key in table:
                    self._print(f"{event.channel} {key} {describe_key(table[key], payloads.get(key))}{tag}")
            for key in event.gone:
                ended = "gone" if key in (frame.get("gone") or ()) else "no longer active (not in the relay's list)"
                self._print(f"{event.channel} {key} {ended}")
        elif event.type == "resync":
            if frame:
                self._print(f"resync {event.channel} reason={frame.get('reason')} "
                            f"gap={frame.get('gap_start')}..{frame.get('gap_end')} (refetch what you follow)")
            else:
                self._print(f"resync {event.channel} ({event.detail})")
        elif event.type == "status":
            self._print(f"listener {frame.get('listener')}")
        elif event.type == "error":
            self._print(f"error {frame.get('code')}: {frame.get('message')}")
        elif event.type == "disconnected":
            self.note(f"{event.detail}; reconnecting in {event.retry_in_s or 0:.1f} s")
        elif event.frame:
            self._print(f"{event.type} {msgspec.json.encode(event.frame).decode()}")

    def close(self) -> None:
        pass


class _Json:
    """``--json``: every relay frame as one NDJSON line on stdout; connection trouble on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err

    def note(self, text: str) -> None:
        print(f"notifyrelay watch: {text}", file=self.err, flush=True)

    def show(self, event: Event, client: RelayClient) -> None:
        if event.frame:
            self.out.write(msgspec.json.encode(event.frame).decode() + "\n")
            self.out.flush()
        elif event.type == "disconnected":
            self.note(f"{event.detail}; reconnecting in {event.retry_in_s or 0:.1f} s")

    def close(self) -> None:
        pass


class _Header:
    """The line above the bars, drawn afresh at each refresh from its current text and style."""

    def __init__(self) -> None:
        self.text, self.style = "connecting ...", ""

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.text, style=self.style)


class _Bars:
    """On a terminal: a header with the connection and listener state, and a live progress bar per key."""

    def __init__(self, out: TextIO, url: str) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, Task, TextColumn
        from rich.progress_bar import ProgressBar

        class _ToneBar(BarColumn):
            """A bar that turns red for a failed key and yellow for a stalled one."""

            def render(self, task: Task) -> ProgressBar:
                bar = super().render(task)
                tone = task.fields.get("tone")
                if tone:
                    bar.complete_style = bar.finished_style = bar.pulse_style = tone
                return bar

        self.url = url
        self.header = _Header()
        self.console = Console(file=out)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[key]}"),
            TextColumn("{task.fields[status]}"),
            _ToneBar(bar_width=30),
            TextColumn("{task.fields[counts]}", justify="right"),
            TextColumn("{task.fields[percent]}", justify="right"),
            TextColumn("{task.fields[rate]}", justify="right"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[message]}"),
            console=self.console,
        )
        self.tasks: dict[tuple[str, str], Any] = {}
        self.live = Live(Group(self.header, self.progress), console=self.console, refresh_per_second=8)
        self.live.start()

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{_clock()}[/] {text}", markup=True, highlight=False)

    def _header(self, client: RelayClient, extra: str = "") -> None:
        if client.connection == "open":
            listener = client.listener or "?"
            state = f"connected (relay {client.instance or '-'}), listener {listener}"
            style = "green" if listener == "up" else "yellow"
        else:
            state, style = client.connection, "red"
        self.header.text, self.header.style = f"{self.url}  {state}{extra}", style

    def show(self, event: Event, client: RelayClient) -> None:
        if event.type == "disconnected":
            self._header(client, f": {event.detail}; reconnecting in {event.retry_in_s or 0:.1f} s")
            return
        self._header(client)
        if event.type in ("notify", "snapshot") and event.channel is not None:
            self._draw(event.channel, client, event)
        elif event.type == "resync":
            self.note(f"resync {event.channel} ({event.frame.get('reason') or event.detail}): refetch what you follow")
        elif event.type == "error":
            self.note(f"[red]error {event.frame.get('code')}[/]: {event.frame.get('message')}")

    def _draw(self, channel: str, client: RelayClient, event: Event) -> None:
        table = client.state.get(channel, {})
        for key, state in table.items():
            fields = self._fields(state, key)
            progress = state.progress
            total = progress.total if progress and progress.total else None
            done = int((progress.done if progress else None) or 0)
            if progress and progress.terminal and total is None:
                total, done = 1.0, 1  # an indeterminate key that ended: a full bar, not a pulse
            task = self.tasks.get((channel, key))
            if task is None:
                self.tasks[(channel, key)] = self.progress.add_task(key, total=total, completed=done, **fields)
            else:
                self.progress.update(task, total=total, completed=done, **fields)
        for gone in [name for name in self.tasks if name[0] == channel and name[1] not in table]:
            # A key the relay says is gone (or no longer active on a "*" snapshot).
            self.progress.remove_task(self.tasks.pop(gone))

    @staticmethod
    def _fields(state: KeyState, key: str) -> dict[str, Any]:
        progress = state.progress
        status = _status(state)
        if progress is None:
            changes = f"{state.changes} change{'s' * (state.changes != 1)}"
            return {"key": key, "status": status, "counts": changes, "percent": "", "rate": "", "eta": "",
                    "message": _message(state) or state.state_error or "", "tone": None}
        tone = "red" if progress.failed else "yellow" if progress.stalled else None
        if progress.stalled:
            status = f"[yellow]STALLED[/] {status}"
        elif progress.failed:
            status = f"[red]{status}[/]"
        elif progress.terminal:
            status = f"[green]{status}[/]"
        return {
            "key": key, "status": status, "counts": f"{_number(progress.done)}/{_number(progress.total or None)}",
            "percent": _percent(progress), "rate": _rate(progress), "eta": f"eta {_duration(progress.eta_s)}",
            "message": _message(state), "tone": tone,
        }

    def close(self) -> None:
        self.live.stop()


# -- --until-done -----------------------------------------------------------------------------------------------


class _UntilDone:
    """Decides when every followed key has ended, and whether any of them failed."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [key for key in keys if key != "*"]
        self.every_key = not keys or "*" in keys
        self.missing: set[str] = set()

    def check(self, event: Event, client: RelayClient) -> None:
        if event.type not in ("notify", "snapshot") or event.channel is None:
            return
        frame = event.frame
        self.missing.update(key for key in event.gone if key in self.keys)
        rows = frame.get("rows") or {}
        named = [key for key in event.keys if key not in event.gone]
        # Rows without progress, or no rows at all (a hint channel): nothing here can say when a key is done.
        if named and not frame.get("progress") and not frame.get("state_error") and (rows or "rows" not in frame):
            raise _Finished(EXIT_USAGE, f"--until-done needs progress on channel {event.channel!r}, and its frames "
                                        "carry none: give the channel a [channels.progress] table")
        table = client.state.get(event.channel, {})
        keys = list(table) if self.every_key else self.keys
        if not keys:
            return
        failed: list[str] = []
        for key in keys:
            progress = table[key].progress if key in table else None
            if key in self.missing or (progress is not None and progress.terminal and progress.failed):
                failed.append(key)
            elif progress is None or not progress.terminal:
                return  # this one is still going
        if failed:
            raise _Finished(EXIT_FAILED, f"failed or missing on {event.channel}: {', '.join(sorted(failed))}")
        raise _Finished(EXIT_OK)


# -- the command ------------------------------------------------------------------------------------------------


async def watch(
    url: str,
    *,
    channel: str | None,
    keys: list[str],
    token: str | None,
    until_done: bool = False,
    json_output: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Follow ``keys`` of ``channel`` (every key, and the relay's first channel, when not given) until Ctrl-C or,
    with ``until_done``, until every followed key has ended. Returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    hint = url_hint(url)
    if hint:
        print(f"notifyrelay watch: {url} is not the relay's websocket URL; try: {hint}", file=err)
        return EXIT_USAGE
    face: _Face
    if json_output:
        face = _Json(out, err)
    elif out.isatty():
        face = _Bars(out, url)
    else:
        face = _Lines(out, err)
    done = _UntilDone(keys) if until_done else None
    follow = {channel: keys or ["*"]} if channel else {}
    status = EXIT_OK
    closing: list[asyncio.Task[None]] = []  # keeps the SIGTERM close task referenced until it is done
    try:
        async with RelayClient(url, follow=follow, token=token) as client:
            # SIGTERM ends the watch like Ctrl-C does: the terminal is left clean and the status is 0.
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, lambda: closing.append(loop.create_task(client.close())))
            async for event in client:
                if event.type == "welcome" and not client.following:
                    if not client.channels:
                        raise _Finished(EXIT_USAGE, "the relay relays no channel")
                    # No channel named: follow the first one the relay offers.
                    await client.follow(client.channels[0], keys or ["*"])
                face.show(event, client)
                if done is not None:
                    done.check(event, client)
    except RelayRefused as exc:
        face.close()
        print(f"notifyrelay watch: {exc.message}", file=err)
        return EXIT_USAGE
    except _Finished as finished:
        status = finished.status
        face.close()
        if finished.message:
            print(f"notifyrelay watch: {finished.message}", file=err)
        return status
    finally:
        face.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    return status
