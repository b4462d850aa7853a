"""TextWorld games as text environments: ``textworld:cooking`` and ``textworld:custom``.

Games are *generated* on first use, never downloaded: ``cooking`` games follow TextWorld's
``tw-cooking`` challenge (the First TextWorld Problems games, close to ALFWorld: find the
cookbook's ingredients, cook and cut them, prepare and eat the meal); ``custom`` games are
TextWorld's generic quests (``tw-make custom``: rooms, objects, a quest of given length).

Spec: ``textworld:<kind>[@train|dev|test][?options]``.  Options common to both kinds:
``games`` (distinct games per split, default 8), ``max_steps`` (default 50) and
``cache_dir``; generation options: see :data:`KINDS` (cooking: ``recipe``, ``take``, ``go``,
``open``, ``cook``, ``cut``, ``drop``, ``foods``; custom: ``world_size``, ``nb_objects``,
``quest_length``).  ``reset(seed)`` plays game ``seed % games`` of the split; the game seeds
of the splits are disjoint (train ``0..``, dev ``100000..``, test ``200000..``) and with
``foods=split`` (default) cooking games of dev/test also use tw-cooking's unseen foods and
preparations.  :meth:`TextWorldEnv.instance_key` names the game seed and options hash.

Cache: ``$AGENTRM_CACHE/textworld`` (default ``~/.cache/agentrm/textworld``), one folder
per kind + generation options + TextWorld version, one sub-folder per game.  Games are
generated in a child process with ``PYTHONHASHSEED=0`` (TextWorld iterates over sets, so
in-process generation differs in ordering between processes); the result is byte-identical
on regeneration apart from the ``.z8`` header's compile date, so :func:`game_fingerprint`
hashes the game's JSON.  A file lock per game plus a rename of a finished temporary folder
keep concurrent workers from generating twice or reading half-written games.

Clone: ``clone_mode = "copy"``.  TextWorld 1.7's own ``copy()`` fails on ``.z8`` games (its
``GameData`` wrapper has none), so :func:`_copy_textworld` opens the game afresh and copies
the Z-machine state (jericho ``get_state``/``set_state``: memory, stack, RNG) and the state
tracker (``GameProgression.copy()``).  Measured on 2 busy cores: clone ~9 ms whatever the
history length; replay 15 ms + ~4 ms per action (98 ms at 20 actions); step ~4 ms; reset
20-80 ms once generated, generation 2-5 s per game.  Tests check copy == replay.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import textworld
import textworld.core

from agentrm.envs.base import NoisyExpert

if TYPE_CHECKING:
    from agentrm.envs.registry import EnvSpec

KINDS: dict[str, dict[str, Any]] = {
    "cooking": {"recipe": 1, "take": 1, "go": 6, "open": True, "cook": True, "cut": True, "drop": False,
                "foods": "split"},
    "custom": {"world_size": 5, "nb_objects": 10, "quest_length": 5},
}
"""Game kind -> its generation options and their defaults (walkthroughs of ~5-15 commands)."""

COMMON_OPTIONS: dict[str, Any] = {"games": 8, "max_steps": 50, "cache_dir": None}
SPLIT_BASE = {"train": 0, "dev": 100_000, "test": 200_000}
"""First game seed of each split; ``games`` is at most the distance between two splits."""
MAX_GAMES = 100_000
GENERATOR_VERSION = 2
"""Part of the cache key: bump when the generation or the game check changes."""
_RETRY_STRIDE = 10_000_019  # seed offset of a retry when a custom quest cannot be generated
_FOOD_SPLITS = {"train": "train", "dev": "valid", "test": "test"}
_BOOL_OPTIONS = {"open", "cook", "cut", "drop"}

INFOS = textworld.EnvInfos(
    admissible_commands=True, policy_commands=True, objective=True, won=True, lost=True,
    score=True, max_score=True, moves=True, feedback=True, extras=["walkthrough"],
)
"""What the TextWorld backend reports each step (admissible and planner commands included)."""

HOW_TO_ACT = {
    "cooking": ("look, inventory, examine <thing>, go <north|south|east|west>, open/close <container or door>, "
                "take <item> [from <holder>], drop <item>, put <item> on <surface>, insert <item> into <container>, "
                "cook <food> with <stove|oven|BBQ>, slice/dice/chop <food> with <knife>, prepare meal, eat <food>"),
    "custom": ("look, inventory, examine <thing>, go <north|south|east|west>, open/close <container or door>, "
               "unlock/lock <door or container> with <key>, take <item> [from <holder>], drop <item>, "
               "put <item> on <surface>, insert <item> into <container>, eat <food>"),
}

_BLOCKED = re.compile(r"^(restart|restore|save|quit|q|undo|oops|script|unscript|transcript|noscript|tw-\S*)\b")
"""Interpreter meta-commands that would desynchronise TextWorld's state tracker; never sent."""
_BANNER_LINE = re.compile(r"^[\s_|\\/$<>]*$")
_STATUS_TAIL = re.compile(r"\n*>\s*(?:-=.*?=-\s*-?\d+/\d+)?\s*$", re.DOTALL)
_RESTART_PROMPT = re.compile(r"\s*Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command\?\s*")


# ---------------------------------------------------------------------------------- options
def parse_options(spec: EnvSpec) -> dict[str, Any]:
    """Validate and normalise a spec's options: all common and kind options, defaults filled in.

    Raises:
        ValueError: naming the spec for an unknown kind, split or option, or a bad value.
    """
    if spec.task not in KINDS:
        raise ValueError(f"env spec {str(spec)!r}: unknown TextWorld game kind {spec.task!r}; use one of {', '.join(KINDS)}")
    if spec.split not in SPLIT_BASE:
        raise ValueError(f"env spec {str(spec)!r}: unknown split {spec.split!r}; use one of {', '.join(SPLIT_BASE)}")
    allowed = {**COMMON_OPTIONS, **KINDS[spec.task]}
    unknown = set(spec.options) - set(allowed)
    if unknown:
        raise ValueError(f"env spec {str(spec)!r}: unknown TextWorld option(s) {sorted(unknown)}; "
                         f"allowed for {spec.task!r}: {', '.join(allowed)}")
    out = dict(allowed)
    for key, value in spec.options.items():
        try:
            out[key] = _coerce(key, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"env spec {str(spec)!r}: bad value {value!r} for option {key!r} ({e})") from None
    problems = []
    if not 1 <= out["games"] <= MAX_GAMES:
        problems.append(f"games must be in 1..{MAX_GAMES}")
    if out["max_steps"] < 1:
        problems.append("max_steps must be >= 1")
    if spec.task == "cooking":
        if out["go"] not in (1, 6, 9, 12):
            problems.append("go must be 1, 6, 9 or 12")
        if not 1 <= out["recipe"] <= 5 or not 0 <= out["take"] <= out["recipe"]:
            problems.append("need 1 <= recipe <= 5 and 0 <= take <= recipe")
        if out["foods"] not in ("split", "all"):
            problems.append("foods must be 'split' or 'all'")
    elif min(out["world_size"], out["nb_objects"], out["quest_length"]) < 1:
        problems.append("world_size, nb_objects and quest_length must be >= 1")
    if problems:
        raise ValueError(f"env spec {str(spec)!r}: {'; '.join(problems)}")
    return out


def _coerce(key: str, value: Any) -> Any:
    if key == "cache_dir":
        return None if value in (None, "") else str(value)
    if key == "foods":
        return str(value)
    if key in _BOOL_OPTIONS:
        if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
            return value.lower() in ("true", "yes")
        if value in (0, 1):
            return bool(value)
        raise ValueError("expected true/false")
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    return int(value)


def generation_settings(kind: str, options: dict[str, Any], split: str) -> dict[str, Any]:
    """The settings the generator receives (cooking's ``foods=split`` resolved to tw-cooking's split)."""
    settings = {k: options[k] for k in KINDS[kind]}
    if kind == "cooking":
        foods = settings.pop("foods")
        settings["split"] = _FOOD_SPLITS[split] if foods == "split" else None
    return settings


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def default_cache_dir() -> Path:
    """``$AGENTRM_CACHE/textworld`` or ``~/.cache/agentrm/textworld``."""
    root = os.environ.get("AGENTRM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "agentrm")
    return Path(root) / "textworld"


# ------------------------------------------------------------------------------- generation
def ensure_game(kind: str, settings: dict[str, Any], game_seed: int, cache_dir: str | Path | None = None) -> Path:
    """Path of the ``.z8`` game for ``(kind, settings, game_seed)``, generating it first if needed.

    Safe with several processes: a per-game file lock, and the game is built in a temporary
    folder renamed into place when complete.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    group = root / f"{kind}-{_digest([kind, settings, textworld.__version__, GENERATOR_VERSION])}"
    final = group / f"g{game_seed}"
    game = final / "game.z8"
    if (final / "meta.json").is_file():
        return game
    group.mkdir(parents=True, exist_ok=True)
    with open(group / f"g{game_seed}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "meta.json").is_file():  # another process made it while we waited
            return game
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-g{game_seed}-", dir=group))
        try:
            meta = _generate_in_child(kind, settings, game_seed, tmp / "game.z8")  # settings are in meta.json
            meta["fingerprint"] = game_fingerprint(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # a half-made folder from a writer that did not lock: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return game


def game_fingerprint(game_dir: str | Path) -> str:
    """sha256 of a generated game's JSON (world, quests, walkthrough): equal iff the same game."""
    return hashlib.sha256((Path(game_dir) / "game.json").read_bytes()).hexdigest()


def _generate_in_child(kind: str, settings: dict[str, Any], game_seed: int, out: Path) -> dict[str, Any]:
    """Run :func:`generate_game` in a child Python with a fixed hash seed; return its metadata."""
    args = json.dumps({"kind": kind, "settings": settings, "seed": game_seed, "out": str(out)})
    env = dict(os.environ, PYTHONHASHSEED="0")
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys, json; from agentrm.envs.textworld import generate_game; " \
           "print(json.dumps(generate_game(**json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, args], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"TextWorld {kind} game generation failed for seed {game_seed}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generate_game(kind: str, settings: dict[str, Any], seed: int, out: str, attempts: int = 8) -> dict[str, Any]:
    """Generate and compile one game to ``out`` (``.z8`` plus ``.json``/``.ni``); return its metadata.

    A game whose quest cannot be generated or that fails :func:`check_game` is replaced by
    the game of seed ``seed + i * 10000019`` (deterministic, and disjoint from every other
    game's seeds); ``generation_seed`` in the metadata records the seed used.
    """
    from textworld.challenges import CHALLENGES
    from textworld.generator import QuestGenerationError, compile_game, make_game

    for attempt in range(attempts):
        options = textworld.GameOptions()
        options.seeds = seed + attempt * _RETRY_STRIDE
        options.path, options.file_ext, options.force_recompile = str(out), ".z8", True
        try:
            if kind == "cooking":
                make = CHALLENGES["tw-cooking"][1]
                game = make(settings={**settings, "recipe_seed": 0}, options=options)
            else:
                options.nb_rooms, options.nb_objects = settings["world_size"], settings["nb_objects"]
                n = settings["quest_length"]
                options.chaining.min_length = options.chaining.max_length = options.chaining.max_depth = n
                game = make_game(options)
        except QuestGenerationError:
            continue
        with contextlib.redirect_stdout(sys.stderr):
            compile_game(game, options)
        if not check_game(out):
            continue
        return {"kind": kind, "settings": settings, "seed": seed, "generation_seed": options.seeds,
                "walkthrough": list(game.metadata.get("walkthrough", [])), "max_score": game.max_score,
                "textworld": textworld.__version__}
    raise RuntimeError(f"no {kind} game could be generated for seed {seed} with {settings} ({attempts} attempts)")


def check_game(path: str | Path) -> bool:
    """Whether the walkthrough wins and no admissible command along it makes the parser ask back.

    TextWorld can name two objects so that one name is part of the other ("locker", "type 0
    locker"); the game then answers an admissible command with "Which do you mean ...?" and
    TextWorld's planner repeats that command forever.  Each admissible command is tried on
    the Z-machine and its state restored (jericho ``get_state``/``set_state``).
    """
    env = _start(path)
    try:
        state = env.reset()
        jericho = env.unwrapped._jericho
        for command in state.get("extra.walkthrough") or []:
            saved = jericho.get_state()
            for action in state["admissible_commands"]:
                feedback = jericho.step(action)[0]
                jericho.set_state(saved)
                if "Which do you mean" in feedback:
                    return False
            state = env.step(command)[0]
        return bool(state["won"])
    finally:
        env.close()


def _start(path: str | Path, infos: Any = INFOS) -> Any:
    """``textworld.start`` without jericho's "not fully supported" warning (TextWorld tracks the score itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not fully supported")
        return textworld.start(str(path), request_infos=infos)


# ------------------------------------------------------------------------------ observations
def clean_feedback(text: str) -> str:
    """TextWorld output without the ASCII banner, the status line, the prompt and the restart question."""
    lines = text.splitlines()
    while lines and _BANNER_LINE.match(lines[0]):
        lines.pop(0)
    text = _STATUS_TAIL.sub("", "\n".join(lines))
    text = "\n".join(line.strip() for line in _RESTART_PROMPT.sub("\n", text).splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def normalize_command(text: str) -> str:
    """One command from free text: the last non-empty line without an ``Action:`` prefix and quotes,
    cut at a full stop or "then" (the parser would run each part as a command in one step).

    Case is kept (the game's parser ignores it).
    """
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    line = re.sub(r"^\s*action\s*:\s*", "", lines[-1] if lines else "", flags=re.IGNORECASE)
    line = re.split(r"\.\s|\s+then\s+", re.sub(r"\s+", " ", line).strip(" .!\"'`*"), flags=re.IGNORECASE)[0]
    return line.strip(" .!\"'`*")


# ---------------------------------------------------------------------------- environment
class TextWorldEnv:
    """A family of generated TextWorld games as an :class:`~agentrm.envs.base.Env`.

    Args:
        kind: ``cooking`` or ``custom`` (see :data:`KINDS`).
        split: ``train``, ``dev`` or ``test``: selects disjoint game seeds.
        options: normalised options (:func:`parse_options`).

    Observations are TextWorld's text (banner, status line and prompt removed).  ``reward``
    is the progress so far, ``score / max_score`` in ``[0, 1]`` (``info["progress"]``), except
    that a command the game does not take (not admissible) earns 0 unless it ends the episode,
    and 0 once the game is lost (e.g. burnt
    food: the score gathered before does not count); ``info["success"]`` is TextWorld's ``won``.
    The episode ends when the game is won or lost or after ``max_steps`` commands (every
    command counts, invalid ones included).  Interpreter meta-commands (``save``, ``undo``,
    ``restart``, ``tw-*`` ...) are refused with feedback, since they would desynchronise
    TextWorld's state tracker.
    """

    clone_mode = "copy"

    def __init__(self, kind: str, split: str = "train", options: dict[str, Any] | None = None):
        from agentrm.envs.registry import EnvSpec

        self.spec: EnvSpec = EnvSpec("textworld", kind, split, options or {})
        self.options = parse_options(self.spec)
        self.kind, self.split = kind, split
        self.games, self.max_steps = self.options["games"], self.options["max_steps"]
        self.settings = generation_settings(kind, self.options, split)
        self.closed = False
        self.seed: int | None = None
        self.game_path: Path | None = None
        self.history: list[str] = []
        """Commands applied since the last reset (raw texts, for replay)."""
        self.done = False
        self._tw: Any = None  # the TextWorld environment (TWInform7 over jericho)
        self._state: Any = None  # its last GameState

    # -------------------------------------------------------------------- Env protocol
    @property
    def instruction(self) -> str:
        """The game's objective plus the command forms it understands."""
        objective = self._state["objective"] if self._state is not None else "Play the TextWorld game."
        return f"{objective.strip()}\nAct with one short command per turn, e.g.: {HOW_TO_ACT[self.kind]}."

    @property
    def valid_actions(self) -> list[str]:
        """TextWorld's admissible commands in the current state (sorted)."""
        return list(self._state["admissible_commands"]) if self._state is not None else []

    @property
    def walkthrough(self) -> list[str]:
        """The generator's walkthrough of the current game (from its start)."""
        return list(self._state.get("extra.walkthrough") or []) if self._state is not None else []

    def game_seed(self, seed: int) -> int:
        """Generation seed of the game ``reset(seed)`` plays: the split's base + ``seed % games``."""
        return SPLIT_BASE[self.split] + int(seed) % self.games

    def instance_key(self, seed: int) -> str:
        """``textworld:<kind>#game=<game seed>&gen=<options hash>`` (split-independent options hash)."""
        gen = _digest([self.kind, {k: self.options[k] for k in KINDS[self.kind]}], 8)
        return f"textworld:{self.kind}#game={self.game_seed(seed)}&gen={gen}"

    def reset(self, seed: int) -> str:
        """Generate (first time) and start game ``seed % games`` of the split; return the first observation."""
        if self.closed:
            raise RuntimeError("reset() of a closed environment")
        path = ensure_game(self.kind, self.settings, self.game_seed(seed), self.options["cache_dir"])
        if self._tw is None or path != self.game_path:
            self._release()
            self._tw = _start(path)
            self.game_path = path
        self._state = self._tw.reset()
        self.seed, self.history, self.done = int(seed), [], False
        return clean_feedback(self._state["feedback"])

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply a text command.

        Returns:
            ``(observation, reward, done, info)`` with info keys ``success``, ``won``, ``lost``,
            ``score``, ``max_score``, ``admissible`` (the command was a valid action),
            ``truncated`` and ``steps``.

        Raises:
            RuntimeError: before ``reset()`` or after the episode ended.
        """
        if self._state is None or self.seed is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        command = normalize_command(action)
        admissible = command.lower() in {a.lower() for a in self._state["admissible_commands"]}
        self.history.append(action)
        if _BLOCKED.match(command.lower()):
            obs = f"The command {command.split()[0]!r} is not available in this game."
        else:
            self._state, _, _ = self._tw.step(command)
            obs = clean_feedback(self._state["feedback"]) or "Nothing happens."
        won, lost = bool(self._state["won"]), bool(self._state["lost"])
        truncated = not (won or lost) and len(self.history) >= self.max_steps
        self.done = won or lost or truncated
        score, max_score = self._state["score"] or 0, self._state["max_score"] or 0
        progress = 0.0 if lost else min(1.0, max(0.0, score / max_score)) if max_score else float(won)
        # the contract: a command the game does not take earns 0, unless it ends the episode
        reward = progress if (admissible or self.done) else 0.0
        info = {"success": won, "won": won, "lost": lost, "score": score, "max_score": max_score,
                "progress": progress, "admissible": admissible, "truncated": truncated, "steps": len(self.history)}
        return obs, float(reward), self.done, info

    def clone(self) -> TextWorldEnv:
        """Exact, independent copy of the current state (see the module docstring for how and its cost)."""
        if self.closed:
            raise RuntimeError("clone() of a closed environment")
        new = copy.copy(self)
        new.history = list(self.history)
        if self._tw is not None:
            new._tw = _copy_textworld(self._tw, self.game_path)
            new._state = new._tw.state  # the copy of self._state (the same object as self._tw.state)
        return new

    def close(self) -> None:
        """Stop the Z-machine and drop the game (idempotent)."""
        self._release()
        self.closed, self.done = True, True

    def _release(self) -> None:
        if self._tw is not None:
            with contextlib.suppress(Exception):
                self._tw.close()
        self._tw, self._state = None, None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0) -> TextWorldExpert:
        """TextWorld's planner with injected errors (:class:`TextWorldExpert`)."""
        return TextWorldExpert(error_rate, seed=seed)

    # --------------------------------------------------------------------------- expert
    def expert_action(self) -> str | None:
        """First command of TextWorld's winning policy from the current state (None: none known)."""
        if self._state is None or self.done:
            return None
        policy = self._state.get("policy_commands") or []
        return policy[0] if policy else None


def _copy_textworld(src: Any, path: Path | None) -> Any:
    """A new TextWorld env in ``src``'s exact state (``TWInform7.copy()`` fails on ``.z8`` in TextWorld 1.7).

    Opens the game afresh, then walks both wrapper chains level by level, copying each
    level's attributes: the jericho Z-machine state by ``get_state``/``set_state``, quest
    progressions by their ``copy()``, game states and lists shallowly (TextWorld builds a
    new state each step and never mutates an old one; its own ``GameState.copy()`` deep-copies
    the whole game, ~0.3 s), the rest (the loaded ``Game``, request infos, paths) by reference.
    An object shared by several levels stays shared in the copy.
    """
    from textworld.generator.game import GameProgression

    memo: dict[int, Any] = {}

    def dup(value: Any) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, GameProgression):
            out = value.copy()
        elif isinstance(value, textworld.core.GameState):
            out = memo[id(value)] = textworld.core.GameState(value)
            for k, v in out.items():
                if isinstance(v, GameProgression):
                    out[k] = dup(v)
        elif isinstance(value, list):
            out = list(value)
        else:
            return value
        memo[id(value)] = out
        return out

    dst = _start(path, src.request_infos)
    a, b = src, dst
    while True:
        for key, value in vars(a).items():
            if key == "_jericho":
                b._jericho.set_state(value.get_state())
            elif key != "_wrapped_env":
                b.__dict__[key] = dup(value)
        if not isinstance(a, textworld.core.Wrapper):
            return dst
        a, b = a._wrapped_env, b._wrapped_env


class TextWorldExpert(NoisyExpert):
    """TextWorld's own planner (``policy_commands``) with injected errors.

    The planner replans from the current state after every step, so the expert recovers
    after deviations.  Each of the ``k`` samples is the planner's next command with
    probability ``1 - error_rate``, otherwise a uniformly random *other* admissible command;
    where the planner has no command, samples are uniform over admissible commands.  The
    expert's command is a function of the env state; the sampling is deterministic given
    ``seed`` and the sequence of calls.
    """

    def propose(self, env: Any, history: Any = None, k: int = 1) -> list[str]:
        """Sample ``k`` commands for ``env``'s current state (``history`` is not needed)."""
        if not isinstance(env, TextWorldEnv):
            raise TypeError(f"TextWorldExpert needs a TextWorldEnv, got {type(env).__name__}")
        return self.sample(env.expert_action(), lambda: env.valid_actions or ["look"], k)


def make(spec: EnvSpec) -> TextWorldEnv:
    """Registry factory: ``textworld:<cooking|custom>[@split][?options]`` (see the module docstring)."""
    env = TextWorldEnv(spec.task, spec.split, dict(spec.options))
    env.spec = spec
    return env
