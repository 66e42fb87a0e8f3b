"""Chat: stream answers from an exported model, with its trained chat template and stop tokens.

The conversation is `appliance.serve.chat.ChatSession`; this screen only consumes its generator
from a thread worker and shows each chunk as it comes (`call_from_thread`). The input is locked
while the model answers; Escape stops the answer. llama.cpp loads when the screen opens, in the
worker, never on the TUI's import path.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Footer, Header, Input, Label, Static

from tui.screens.base import AppScreen


class Bubble(Static):
    """One turn of the conversation."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=f"bubble {role}")
        self.role = role
        self.text = text
        self.border_title = "you" if role == "user" else "model" if role == "assistant" else "note"

    def on_mount(self) -> None:
        self.update(Text(self.text))  # model output is shown as it is, never read as markup

    def append(self, piece: str) -> None:
        self.text += piece
        self.update(Text(self.text))


class ChatScreen(AppScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop_or_back", "Stop / back"),
        Binding("ctrl+r", "reset", "Forget the conversation"),
    ]
    answering: reactive[bool] = reactive(False)

    def __init__(self, model: str, quant: str | None = None, temperature: float = 0.7, free: bool = False) -> None:
        super().__init__()
        self.model_spec = model
        self.quant = quant
        self.temperature = temperature
        self.free = free
        self.session: Any = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]Chat[/b] {self.model_spec}: loading…", id="chat-title")
        with Horizontal(id="chat-settings"):
            yield Label("system")
            yield Input(id="chat-system", placeholder="the system prompt the model was trained with")
        yield VerticalScroll(id="chat-log")
        yield Input(id="chat-input", placeholder="loading the model…", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="chat-load", exit_on_error=False)
    def load(self) -> None:
        from appliance.config import Sampling
        from appliance.errors import ApplianceError
        from appliance.serve.chat import ChatSession
        from appliance.serve.model import resolve

        try:
            served = resolve(self.store, self.model_spec, self.quant)
            session = ChatSession.open(served, Sampling(temperature=self.temperature), constrain=not self.free)
        except ApplianceError as exc:
            self.app.call_from_thread(self._failed, exc.message, exc.hint)
            return
        except (OSError, ValueError) as exc:  # llama.cpp could not load the file
            self.app.call_from_thread(self._failed, f"the model could not be loaded: {exc}",
                                      "Run `appliance verify RUN`; export again if a file changed.")
            return
        self.app.call_from_thread(self._ready, session)

    def _failed(self, message: str, hint: str) -> None:
        self.query_one("#chat-title", Static).update(f"[b]Chat[/b] [red]{escape(message)}[/]\n{escape(hint)}")
        self.notify(f"{message}\n{hint}", title="Cannot chat", severity="error", timeout=10)

    def _ready(self, session: Any) -> None:
        self.session = session
        served = session.model
        held = f" · answers held to its {session.constrained[1]}" if session.constrained else ""
        self.query_one("#chat-title", Static).update(
            f"[b]Chat[/b] {escape(served.name)} · {escape(served.quant or served.path.name)} · "
            f"{'verified' if served.verified else '[yellow]not verified[/]'} · {session.n_ctx}-token context{held}")
        self.query_one("#chat-system", Input).value = session.system or ""
        box = self.query_one("#chat-input", Input)
        box.disabled = False
        box.placeholder = "ask something (Enter sends, Escape stops an answer)"
        box.focus()

    def watch_answering(self, answering: bool) -> None:
        if self.session is not None:
            self.query_one("#chat-input", Input).disabled = answering

    @on(Input.Submitted, "#chat-system")
    def _system(self, message: Input.Submitted) -> None:
        if self.session is not None:
            self.session.system = message.value.strip() or None
            self.notify("system prompt set" if self.session.system else "system prompt removed")

    @on(Input.Submitted, "#chat-input")
    def _send(self, message: Input.Submitted) -> None:
        text = message.value.strip()
        if not text or self.session is None or self.answering:
            return
        message.input.value = ""
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Bubble("user", text))
        answer = Bubble("assistant")
        log.mount(answer)
        log.scroll_end(animate=False)
        self.answering = True
        self.stream(text, answer)

    @work(thread=True, exclusive=True, group="chat-answer", exit_on_error=False)
    def stream(self, text: str, answer: Bubble) -> None:
        from appliance.errors import ApplianceError
        from appliance.serve.chat import Notice

        try:
            for piece in self.session.send(text):
                if isinstance(piece, Notice):
                    self.app.call_from_thread(self._note, piece.message)
                else:
                    self.app.call_from_thread(self._piece, answer, piece)
        except ApplianceError as exc:
            self.app.call_from_thread(self._note, f"{exc.message} ({exc.hint})")
        finally:
            self.app.call_from_thread(self._answered)

    def _piece(self, answer: Bubble, piece: str) -> None:
        answer.append(piece)
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def _note(self, text: str) -> None:
        self.query_one("#chat-log", VerticalScroll).mount(Bubble("note", text))

    def _answered(self) -> None:
        self.answering = False
        last = self.session.last if self.session is not None else None
        if last is not None:
            state = " · stopped" if last.cancelled else ""
            self.query_one("#chat-title", Static).border_subtitle = \
                f"{last.completion_tokens} tokens · {last.tokens_per_s:.0f} tokens/s{state}"
        self.query_one("#chat-input", Input).focus()

    def action_stop_or_back(self) -> None:
        if self.answering and self.session is not None:
            self.session.cancel()
        else:
            self.app.pop_screen()

    def action_reset(self) -> None:
        if self.session is not None and not self.answering:
            self.session.reset()
            self.query_one("#chat-log", VerticalScroll).remove_children()
            self.notify("conversation forgotten")
