"""The one table of the app's actions: key bindings, the footer, the command palette and the help screen
all come from it, so a key is defined in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Action:
    action: str  # the app's action (with arguments), e.g. "pane('lens')"
    keys: str  # Textual key names, comma-separated; "" for palette-only actions
    label: str  # short name in the footer
    help: str  # one line for the help screen and the palette
    title: str = ""  # the palette entry (default: the label)
    key_display: str | None = None  # how the footer writes the keys (default: Textual's)
    footer: bool = False
    palette: bool = True
    needs_session: bool = True  # disabled until a model is loaded, and under dialogs
    priority: bool = False

    @property
    def name(self) -> str:
        return self.action.split("(", 1)[0]

    @property
    def command(self) -> str:
        return self.title or self.label

    @property
    def shown_keys(self) -> str:
        """The keys as the help screen writes them: ``ctrl+p / p``, ``f1 / ?``."""
        return " / ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in self.keys.split(","))


KEY_NAMES = {"question_mark": "?", "colon": ":", "left_square_bracket": "[", "right_square_bracket": "]",
             "left": "←", "right": "→", "up": "↑", "down": "↓", "home": "Home", "end": "End", "escape": "Escape",
             "f1": "F1", "f2": "F2", "left_curly_bracket": "{", "right_curly_bracket": "}", "enter": "Enter"}


ACTIONS: list[Action] = [
    Action("generate", "g", "Gen", "generate up to max-new-tokens more tokens", footer=True),
    Action("step", "n", "Step", "generate exactly one token"),
    Action("stop", "escape", "Stop", "stop generating (within one step)", footer=True),
    Action("branch", "b", "Branch", "from the selected token, continue with the ▶ candidate", footer=True),
    Action("switch_branch", "B", "Other line", "go back to the line of generation you came from, and again to "
           "return (lines are numbered; every line is in the palette)"),
    Action("save", "ctrl+s", "Save", "save a snapshot of the KV cache (file name, codec)", "Save snapshot",
           footer=True),
    Action("load", "ctrl+o", "Load", "load a snapshot (its header is shown first)", "Load snapshot", footer=True),
    Action("prune", "ctrl+p,p", "Prune", "prune the KV cache: method and budget, what is dropped shown before you confirm", "Prune cache", key_display="p",
           footer=True),
    Action("undo_prune", "u", "Undo prune", "undo the last prune (possible until the next turn)", "Undo prune"),
    Action("export", "ctrl+e", "Export", "export the trace as JSON Lines (the --dump schema, every step's lens "
           "computed)", "Export trace", priority=True),
    Action("history", "h", "History", "the snapshot store's history: every saved turn and branch, to go back to",
           "History of saved turns"),
    Action("copy('token')", "c", "Copy token", "copy the selected token's details (clipboard via OSC 52, and "
           "kvtrace-copy.txt)", "Copy token details"),
    Action("copy('reply')", "y", "Copy reply", "copy the last reply (clipboard via OSC 52, and kvtrace-copy.txt)",
           "Copy reply"),
    Action("copy('chat')", "Y", "Copy chat", "copy the whole chat (clipboard via OSC 52, and kvtrace-copy.txt)",
           "Copy chat"),
    Action("move(-1)", "left", "Previous token", "select the previous generated token (or click it)",
           palette=False),
    Action("move(1)", "right", "Next token", "select the next generated token", palette=False),
    Action("first", "home", "First token", "select the first generated token", palette=False),
    Action("last", "end", "Last token", "select the last generated token", palette=False),
    Action("candidate(-1)", "up", "Previous candidate", "choose the top-k candidate (▶) above for branching (or "
           "click it; a double click branches)", palette=False),
    Action("candidate(1)", "down", "Next candidate", "choose the top-k candidate (▶) below for branching",
           palette=False),
    Action("attention_mode", "a", "Mean/layer/heads", "attention pane: the mean over layers, one layer, or that "
           "layer's heads side by side"),
    Action("attention_layer(-1)", "left_square_bracket", "Previous layer", "attention pane: previous layer",
           key_display="[", palette=False),
    Action("attention_layer(1)", "right_square_bracket", "Next layer", "attention pane: next layer",
           key_display="]", palette=False),
    Action("attention_head(-1)", "left_curly_bracket", "Previous head", "attention pane: that layer's heads, "
           "previous head", key_display="{", palette=False),
    Action("attention_head(1)", "right_curly_bracket", "Next head", "attention pane: that layer's heads, next head",
           key_display="}", palette=False),
    Action("pane('topk')", "1", "Show top-k", "show the top-k pane (narrow terminals)"),
    Action("pane('attention')", "2", "Show attention", "show the attention pane (narrow terminals)"),
    Action("pane('lens')", "3", "Show lens", "show the lens pane (narrow terminals), with bars of what each "
           "layer's attention and MLP added to the chosen token's logit (direct logit attribution, relative to the "
           "mean logit: the usual linear approximation, the final norm's scale frozen at this position)"),
    Action("pane('grid')", "4", "Show grid", "show the lens grid: tokens across, layers down, each cell the "
           "layer's top-1 shaded by a metric; ↑ ↓ pick a layer, Enter opens the cell"),
    Action("grid_metric", "m", "Grid metric", "lens grid: shade by the next metric (p top-1, p chosen, rank "
           "chosen, KL to final, entropy)"),
    Action("open_cell", "enter", "Open cell", "lens grid: the selected token's top-k at the layer under the "
           "cursor, with its numbers", palette=False),
    Action("picture", "x", "Picture", "save the lens grid and the reply's probability and entropy sparklines "
           "as an SVG picture (kvtrace-grid-<time>.svg)", "Save grid picture"),
    Action("lines", "l", "Lines", "the lines of generation: compare two side by side from where they part, "
           "name one, switch to one", "Compare lines"),
    Action("export_tensors", "t", "Tensors", "export the selected token's tensors (hidden states, attention kept, "
           "logits) as .safetensors with a JSON sidecar, for TransformerLens or nnsight", "Export step tensors"),
    Action("focus_input", "i", "Type a message", "go to the input box"),
    Action("help", "f1,question_mark", "Help", "show every key (F1 works in the input box too)", key_display="F1",
           footer=True, needs_session=False),
    Action("command_palette", "f2,colon", "Palette", "command palette: every action (ctrl+p is prune here)",
           palette=False, needs_session=False, priority=True),
    Action("leave", "q", "Quit", "quit (ctrl+q also from the input box); asks first while a reply is being "
           "generated or there are unsaved changes", footer=True, needs_session=False),
]

SESSION_ACTIONS = frozenset(a.name for a in ACTIONS if a.needs_session)
MODAL_BLOCKED = frozenset(a.name for a in ACTIONS if a.name != "command_palette")


def bindings() -> list[Binding]:
    """Textual bindings for every action that has keys."""
    return [
        Binding(a.keys, a.action, a.label, show=a.footer, key_display=a.key_display, priority=a.priority,
                tooltip=a.help)
        for a in ACTIONS if a.keys
    ]


def palette_entries() -> list[Action]:
    return [a for a in ACTIONS if a.palette]


def help_rows() -> list[tuple[str, str]]:
    """(keys, what they do) for the help screen: Enter and Tab first, then the table."""
    first = [a for a in ACTIONS if a.name in ("command_palette", "help")]
    rows = [("Enter", "send the message in the input box and generate the reply"),
            ("Tab / shift+Tab", "move the focus between the input, the timeline and the chat"),
            ("PageUp / PageDown", "scroll the focused timeline or chat (the mouse wheel scrolls any pane)")]
    return rows + [(a.shown_keys, a.help) for a in [*first, *(a for a in ACTIONS if a not in first)] if a.keys]
