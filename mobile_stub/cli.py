"""`python -m mobile_stub`: the reference phone app as a command line (public protocol only)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import signal
import socket
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from mobile_stub.client import (
    ApiError,
    Decider,
    DeviceAuthError,
    Event,
    PhoneClient,
    SessionEnded,
    enroll,
)
from mobile_stub.protocol import (
    Approval,
    Decision,
    EnrollLinkError,
    number_choices,
    parse_enroll,
    passcode_at,
    seconds_left,
)
from mobile_stub.state import DeviceState, StateError, check_writable, load_state, save_state

EXIT_OK = 0
EXIT_FAILED = 1  # the server said no (API error, error frame, fatal close)
EXIT_USAGE = 2  # bad arguments, link or state file
EXIT_REVOKED = 3  # the device token is revoked or invalid (HTTP 401 / close 4401)
NUMBER_POLL = 0.1  # seconds between reads of a --number-from file that is still empty

EPILOG = """exit codes: 0 ok, 1 refused by the server, 2 bad arguments/link/state file,
3 device token revoked or invalid (enroll again)"""


class Output:
    """Where results go: human text on stdout, or exactly one JSON object per line with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # Prompts must not pollute a machine-read stdout.
        self.prompts: TextIO = sys.stderr if as_json else sys.stdout
        # The question on screen waiting for a typed line, and the approval it is about.
        self._question: tuple[str, str | None] | None = None

    def ask(self, prompt: str, about: str | None = None) -> None:
        """Show a question; it stays open until `answered()`."""
        print(prompt, end="", file=self.prompts, flush=True)
        self._question = (prompt, about)

    def answered(self) -> None:
        """The person answered the open question (or it no longer matters)."""
        self._question = None

    def line(self, text: str, *, file: TextIO | None = None, ends: str | None = None) -> None:
        """Print a line that arrived on its own (a new request, a reconnect) without landing on
        an open question's line: the question is asked again below it, unless the line says
        that the approval it is about ended (`ends`)."""
        question = self._question
        if question is not None:
            # On a terminal, overwrite the prompt's line; elsewhere just end it.
            clear = "\r\x1b[K" if self.prompts.isatty() else "\n"
            print(clear, end="", file=self.prompts, flush=True)
        print(text, file=file or sys.stdout, flush=True)
        if question is not None:
            if ends is not None and question[1] == ends:
                self._question = None
            else:
                print(question[0], end="", file=self.prompts, flush=True)

    def result(self, obj: dict[str, Any], text: str) -> None:
        """Print a command's result: `obj` as JSON, or `text` for a person."""
        print(json.dumps(obj) if self.as_json else text, flush=True)

    def error(self, code: str, message: str) -> None:
        """Print a failure: `{"error","message"}` on stdout with --json, else on stderr."""
        if self.as_json:
            print(json.dumps({"error": code, "message": message}), flush=True)
        else:
            print(f"error: {code}: {message}", file=sys.stderr, flush=True)


# -- stdin ---------------------------------------------------------------------------------


class StdinLines:
    """Lines typed on stdin, read by a daemon thread so a pending prompt never blocks exit."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] | None = None

    def _lines(self) -> asyncio.Queue[str | None]:
        if self._queue is None:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[str | None] = asyncio.Queue()

            def pump() -> None:
                try:
                    for line in sys.stdin:
                        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                except RuntimeError:  # the loop closed while we were reading: exiting anyway
                    return

            threading.Thread(target=pump, name="stdin-lines", daemon=True).start()
            self._queue = queue
        return self._queue

    async def readline(self, *, discard_typed_ahead: bool = False) -> str | None:
        """The next line, or None at end of input.

        `discard_typed_ahead` drops lines typed before the question was asked, so a stray
        Enter cannot answer a request the person has not seen yet.
        """
        queue = self._lines()
        if discard_typed_ahead:
            while not queue.empty():
                if queue.get_nowait() is None:
                    queue.put_nowait(None)
                    break
        line = await queue.get()
        if line is None:
            queue.put_nowait(None)  # end of input stays the end
        return line


# -- deciders ------------------------------------------------------------------------------


def interactive_decider(stdin: StdinLines, out: Output) -> Decider:
    """Ask the person for the number, then approve / deny / report fraud."""
    one_at_a_time = asyncio.Lock()

    async def decide(approval: Approval) -> Decision | None:
        aid = approval.get("id")

        async def ask(prompt: str, *, fresh: bool = False) -> str | None:
            out.ask(prompt, about=aid if isinstance(aid, str) else None)
            try:
                return await stdin.readline(discard_typed_ahead=fresh)
            finally:
                out.answered()

        async with one_at_a_time:
            choices = number_choices(approval)
            hint = f" [{'/'.join(choices)}]" if choices else ""
            shown_by = number_source(approval)
            number: str | None
            if confirm_only(approval) and choices:
                number = choices[0]  # phone-only confirmation: nothing to compare
            else:
                number = await ask(f"Number shown {shown_by}{hint}: ", fresh=True)
            while number is not None:
                action = await ask("Approve, deny or report fraud? [a/d/f]: ")
                if action is None:
                    break
                action = action.strip().lower()
                if action in ("a", "approve"):
                    if number.strip():
                        return Decision.approve(number)
                    number = await ask(f"Approving needs the number shown {shown_by}: ")
                elif action in ("d", "deny"):
                    return Decision.deny(number)
                elif action in ("f", "fraud"):
                    return Decision.fraud(number)
                else:
                    print("Please answer a (approve), d (deny) or f (fraud).", file=out.prompts)
            print("\n(end of input: request left unanswered)", file=out.prompts, flush=True)
            return None

    return decide


async def read_number(source: str, stdin: StdinLines) -> str | None:
    """The number for an automatic approval: one stdin line (`-`), or a file's content.

    A file that is missing or empty is polled until it has content, because the request
    usually reaches the phone before the browser side has written the number.
    """
    if source == "-":
        line = await stdin.readline()
        return None if line is None else line.strip()
    path = Path(source)
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = (await asyncio.to_thread(path.read_text, encoding="utf-8")).strip()
            if text:
                return text
        await asyncio.sleep(NUMBER_POLL)


def auto_decider(mode: str, number_from: str | None, stdin: StdinLines, out: Output) -> Decider:
    """Answer every request the same way; `approve` reads the number from `number_from`."""

    async def decide(approval: Approval) -> Decision | None:
        if mode == "deny":
            return Decision.deny()
        if mode == "fraud":
            return Decision.fraud()
        assert number_from is not None
        number = await read_number(number_from, stdin)
        if number is None:
            print("(no more numbers on stdin: request left unanswered)", file=out.prompts)
            return None
        choices = number_choices(approval)
        if choices is not None and number not in choices:
            print(f"warning: {number!r} is not among the choices {choices}", file=sys.stderr)
        return Decision.approve(number)

    return decide


# -- event display -------------------------------------------------------------------------


# Not shown as themselves: controls (newline, ESC, C1 CSI), format characters (bidi
# overrides), line separators, and lone surrogates (which would not even print).
_UNSHOWN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(value: object) -> str:
    """`value` as text without the characters that steer a terminal or reorder a line, so a
    field from the server or a relying party cannot forge or hide lines of the request."""
    return "".join(char for char in str(value) if unicodedata.category(char) not in _UNSHOWN)


def confirm_only(approval: Approval) -> bool:
    """Whether the request is confirmed on the phone alone (match mode `confirm`): the
    relying party shows no number, and the one choice is the number to send."""
    match = approval.get("match")
    return isinstance(match, dict) and match.get("mode") == "confirm"


def context_details(approval: Approval) -> list[tuple[str, str]]:
    """The labelled lines a relying party added to the context (`details`), printable."""
    context = approval.get("context") or {}
    details = context.get("details") if isinstance(context, dict) else None
    if not isinstance(details, list):
        return []
    return [
        (printable(item.get("label", "")), printable(item.get("value", "")))
        for item in details
        if isinstance(item, dict)
    ]


def relying_party(approval: Approval) -> str | None:
    """The name of the relying party (VPN, SSH, another app) that asks, if it is one."""
    requester = approval.get("requester")
    if not isinstance(requester, dict) or requester.get("kind") != "rp":
        return None
    name = requester.get("name")
    return printable(name) if isinstance(name, str) and name else "a relying party"


def number_source(approval: Approval) -> str:
    """Where the person reads the number: the browser, or the relying party's own screen."""
    name = relying_party(approval)
    return "in the browser" if name is None else f"by {name}"


def describe_approval(approval: Approval, now: float) -> list[str]:
    """The lines a phone shows for a request: who asks (browser, OS, IP, or the relying
    party and the context it gave), time left, how to match."""
    context = {name: printable(value) for name, value in (approval.get("context") or {}).items()}
    left = seconds_left(approval, now)
    match = approval.get("match") or {}
    choices = number_choices(approval)
    name = relying_party(approval)
    if name is None:
        lines = [
            f"Login approval request {approval.get('id')}",
            f"  Browser:  {context.get('browser') or '?'}",
            f"  OS:       {context.get('os') or '?'}",
            f"  IP:       {context.get('ip') or '?'}",
        ]
    else:
        # No browser is involved: the context is what the relying party sent, or its own
        # request's (a server's HTTP client), so it is not labelled as a browser.
        lines = [
            f"Approval request {approval.get('id')} from {name}",
            f"  From:     {name} (a service, not a browser sign-in)",
            f"  IP:       {context.get('ip') or '?'}",
        ]
        client = " on ".join(
            str(v) for v in (context.get("browser"), context.get("os")) if v and v != "Unknown"
        )
        if client:
            lines.append(f"  Client:   {client}")
        # What the relying party said about its request (a Duo client's pushinfo).
        lines += [f"  {label + ':':<9} {value}" for label, value in context_details(approval)]
    lines.append(f"  Expires:  {'?' if left is None else f'in {left:.0f} s'}")
    shown = number_source(approval)
    if confirm_only(approval) and choices:
        # Phone-only confirmation: nobody shows a number; the one choice is what to send.
        lines.append("  Confirm:  approve or deny on this phone (no number to compare)")
    elif choices:
        lines.append(f"  Choices:  {'   '.join(choices)}  (pick the number shown {shown})")
    else:
        digits = match.get("digits", "?")
        lines.append(f"  Match:    type the {digits}-digit number shown {shown}")
    return lines


# What a person reads for the errors a decision can get (PROTOCOL §3), instead of the code.
DECISION_ERRORS = {
    "wrong_number": "Wrong number: the request was denied",
    "already_decided": "Already answered (on another device, or by an earlier answer)",
    "expired": "Too late: the request had expired",
    "bad_signature": "The server could not verify this device's signature",
    "not_found": "The server does not know this request",
}


def event_printer(out: Output, clock: Callable[[], float] = time.time) -> Callable[[Event], None]:
    """Print each client event: one JSON line with --json, else a short human sentence.

    Events arrive on their own, so each goes through `Output.line`: a question on screen is
    asked again below it.
    """

    def show(event: Event) -> None:
        name = event["event"]
        # These end the approval a question may be about: no point asking it again.
        ends = event.get("id") if name in ("approval_resolved", "decision_result") else None
        if out.as_json:
            out.line(json.dumps(event, default=str), ends=ends)
            return
        text: str | None
        if name == "connected":
            text = f"Connected to {event['url']}"
        elif name == "ready":
            text = f"Ready as device {event.get('device_id')}; waiting for approval requests"
        elif name == "approval_request":
            again = f"(request {event['id']} sent again by the server after a reconnect; "
            if not event.get("repeat"):
                text = "\n".join(describe_approval(event["approval"], clock()))
            elif event.get("answer") == "sent":
                text = again + "already answered)"
            elif event.get("answer") == "deciding":
                text = again + "still waiting for your answer)"
            else:
                text = again + "it was left unanswered)"
        elif name == "decision_sent":
            what = "resent decision" if event.get("resent") else f"Sent: {event.get('decision')}"
            if event.get("reason"):
                what += f" ({event['reason']})"
            text = f"{what} for {event['id']}"
        elif name == "decision_result":
            text = f"Result for {event.get('id')}: {event.get('status')}"
        elif name == "error":
            human = DECISION_ERRORS.get(str(event.get("error")))
            if human is not None:
                text = human + (f" (request {event['id']})" if event.get("id") else "")
            else:
                where = f" for {event['id']}" if event.get("id") else ""
                text = f"Server error{where}: {event.get('error')}"
        elif name == "approval_resolved":
            text = f"Approval {event.get('id')} ended: {event.get('status')}"
        elif name == "disconnected":
            detail = event.get("error") or f"close {event.get('code')} {event.get('reason', '')}"
            text = f"Disconnected ({detail.strip()})"
        elif name == "reconnecting":
            text = f"Reconnecting in {event['delay']:.2f} s (attempt {event['attempt']})"
        elif name == "fatal":
            out.line(f"error: {event.get('message')}", file=sys.stderr)
            text = None
        elif name == "passcode_seed":
            text = "Received the offline passcode seed (python -m mobile_stub passcode shows codes)"
        elif name in ("stopped", "skipped"):
            text = None
        else:
            text = f"{name}: {json.dumps({k: v for k, v in event.items() if k != 'event'})}"
        if text is not None:
            out.line(text, ends=ends)

    return show


# -- commands ------------------------------------------------------------------------------


async def cmd_enroll(args: argparse.Namespace, out: Output) -> int:
    """Generate a key, register it with the enrollment code, save the state file."""
    target = parse_enroll(args.link, args.server)
    check_writable(args.state, overwrite=args.force)
    push = None
    if args.push_provider:
        push = {"provider": args.push_provider, "token": args.push_token}
    state = await enroll(target, name=args.name, platform=args.platform, push=push)
    save_state(args.state, state, overwrite=args.force)
    out.result(
        {"device_id": state.device_id, "user": {"email": state.user_email}},
        f"Enrolled device {state.device_id} for {state.user_email} at {state.server_url}\n"
        f"State saved to {args.state} (mode 0600)",
    )
    return EXIT_OK


async def cmd_run(args: argparse.Namespace, out: Output) -> int:
    """Hold the device socket and answer requests until interrupted (or --once)."""
    state = load_state(args.state)
    stdin = StdinLines()
    if args.auto:
        decide = auto_decider(args.auto, args.number_from, stdin, out)
    else:
        decide = interactive_decider(stdin, out)

    def keep_seed(updated: DeviceState) -> None:
        save_state(args.state, updated, overwrite=True)

    async with PhoneClient(state, on_event=event_printer(out), keep_seed=keep_seed) as phone:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, phone.stop)
        try:
            result = await phone.run(decide, once=args.once)
        except DeviceAuthError:
            return EXIT_REVOKED
        except SessionEnded:
            return EXIT_FAILED
    if result is not None and result["event"] == "error":
        return EXIT_FAILED
    return EXIT_OK


async def cmd_pending(args: argparse.Namespace, out: Output) -> int:
    """List the user's pending approvals."""
    async with PhoneClient(load_state(args.state)) as phone:
        approvals = await phone.pending()
    now = time.time()
    text = "\n".join("\n".join(describe_approval(a, now)) for a in approvals)
    out.result({"approvals": approvals}, text or "No pending approvals")
    return EXIT_OK


async def cmd_decide(args: argparse.Namespace, out: Output) -> int:
    """Approve or deny one approval over HTTP."""
    if args.command == "approve":
        decision = Decision.approve(args.number)
    else:
        decision = Decision.fraud() if args.fraud else Decision.deny()
    async with PhoneClient(load_state(args.state)) as phone:
        answer = await phone.decide_http(args.approval_id, decision)
    status = answer.get("status")
    out.result({"id": args.approval_id, "status": status}, f"{args.approval_id}: {status}")
    return EXIT_OK


async def cmd_passcode(args: argparse.Namespace, out: Output) -> int:
    """Print the current offline passcode (works without a network)."""
    state = load_state(args.state)
    if not state.passcode_secret:
        raise StateError(
            f"{args.state} holds no passcode seed yet: connect once (python -m mobile_stub run)"
        )
    shown = passcode_at(state.passcode_secret, time.time())
    out.result(
        {"passcode": shown.code, "expires_in": shown.seconds_left},
        f"{shown.code[:3]} {shown.code[3:]}  (changes in {shown.seconds_left} s)",
    )
    return EXIT_OK


async def cmd_unenroll(args: argparse.Namespace, out: Output) -> int:
    """Remove the device from the account, then delete its state file."""
    state = load_state(args.state)
    async with PhoneClient(state) as phone:
        await phone.unenroll()
    if not args.keep_state:
        await asyncio.to_thread(Path(args.state).unlink, missing_ok=True)
    out.result(
        {"device_id": state.device_id, "unenrolled": True},
        f"Device {state.device_id} removed"
        + ("" if args.keep_state else f"; deleted {args.state}"),
    )
    return EXIT_OK


def default_device_name() -> str:
    """`mobile_stub on <this OS> (<host>)`: the real platform shows in the device's name,
    since the contract's `platform` can only say android, ios or web."""
    system = {"Darwin": "macOS"}.get(platform.system(), platform.system() or "unknown OS")
    return f"mobile_stub on {system} ({socket.gethostname()})"[:100]  # the server's limit


COMMANDS = {
    "enroll": cmd_enroll,
    "run": cmd_run,
    "pending": cmd_pending,
    "approve": cmd_decide,
    "deny": cmd_decide,
    "passcode": cmd_passcode,
    "unenroll": cmd_unenroll,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m mobile_stub",
        description="tapprove reference phone: enroll a device and answer login approvals.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.add_argument("--state", required=True, metavar="FILE", help="device state file (0600)")
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")
        return p

    p = command("enroll", "enroll this device with an enrollment link or code")
    p.add_argument("link", metavar="URI_OR_CODE", help="tapprove://enroll?url=...&code=... or code")
    p.add_argument("--server", metavar="URL", help="server base URL (needed for a bare code)")
    p.add_argument("--name", default=default_device_name(), help="device name")
    # The contract knows only android, ios and web; this client is none of the first two.
    p.add_argument("--platform", choices=("android", "ios", "web"), default="web")
    p.add_argument("--push-provider", choices=("fcm", "apns"))
    p.add_argument("--push-token", metavar="TOKEN")
    p.add_argument("--force", action="store_true", help="overwrite an existing state file")

    p = command("run", "connect and answer approval requests as they arrive")
    p.add_argument("--auto", choices=("approve", "deny", "fraud"), help="answer without asking")
    p.add_argument(
        "--number-from",
        metavar="FILE_OR_-",
        help="with --auto approve: file holding the number (re-read per request), or - for "
        "one stdin line per request",
    )
    p.add_argument("--once", action="store_true", help="exit after the first decision result")

    command("pending", "list pending approvals")

    p = command("approve", "approve one approval over HTTP")
    p.add_argument("approval_id", metavar="ID")
    p.add_argument("--number", required=True, help="the number shown in the browser")

    p = command("deny", "deny one approval over HTTP")
    p.add_argument("approval_id", metavar="ID")
    p.add_argument("--fraud", action="store_true", help="report fraud (locks the account)")

    command("passcode", "show the current offline passcode (no network needed)")

    p = command("unenroll", "remove this device from the account and delete its state")
    p.add_argument("--keep-state", action="store_true", help="keep the state file")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; exits with usage (2) on a bad one."""
    if args.command == "enroll" and bool(args.push_provider) != bool(args.push_token):
        parser.error("--push-provider and --push-token go together")
    if args.command == "run":
        if args.auto == "approve" and not args.number_from:
            parser.error(
                "--auto approve needs --number-from FILE or - (the phone cannot know "
                "which number the browser shows)"
            )
        if args.number_from and args.auto != "approve":
            parser.error("--number-from only goes with --auto approve")


async def dispatch(args: argparse.Namespace, out: Output) -> int:
    """Run one command, turning expected failures into a message and an exit code."""
    try:
        return await COMMANDS[args.command](args, out)
    except (EnrollLinkError, StateError) as exc:
        out.error("usage", str(exc))
        return EXIT_USAGE
    except ApiError as exc:
        out.error(exc.code, DECISION_ERRORS.get(exc.code, exc.message))
        return EXIT_REVOKED if exc.status == 401 else EXIT_FAILED
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        out.error("unreachable", f"cannot reach the server{_tried(exc)}: {reason}")
        return EXIT_FAILED


def _tried(exc: httpx.HTTPError) -> str:
    """` at <URL>` for the request that failed, so a wrong server address is easy to see."""
    try:
        return f" at {exc.request.url}"
    except RuntimeError:  # an error raised before any request was made
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv`, run the command, return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return asyncio.run(dispatch(args, Output(args.json)))
