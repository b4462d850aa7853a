"""BabyAI as a text environment, built on minigrid's registered ``BabyAI-<level>-v0`` envs.

Observations are short sentences derived from the agent's egocentric partial view
(7x7 cells, walls occlude), e.g.::

    Facing east, carrying a red key. Wall 3 ahead. Grey ball 2 ahead 1 left, blue box 1 right.

"N ahead" counts cells in the facing direction, "N left/right" cells sideways.  They are
deliberately terse (typically well under 30 words) because they are tokenised for
small reward models.  Actions are text: ``turn left``, ``turn right``, ``move forward``,
``pick up``, ``drop``, ``toggle``.  minigrid's ``done`` action is a no-op in BabyAI (unless
``BABYAI_DONE_ACTIONS`` is set), so it is not offered.

Rewards and termination come from minigrid itself: success gives
``1 - 0.9 * step_count / max_steps``, running out of steps gives 0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI envs with gymnasium)
from minigrid.core.actions import Actions
from minigrid.core.constants import COLOR_NAMES

if TYPE_CHECKING:
    from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy
    from agentrm.envs.registry import EnvSpec  # noqa: F811

ACTIONS: dict[str, int] = {
    "turn left": Actions.left,
    "turn right": Actions.right,
    "move forward": Actions.forward,
    "pick up": Actions.pickup,
    "drop": Actions.drop,
    "toggle": Actions.toggle,
}
"""Canonical action text -> minigrid action id."""

_ALIASES: dict[str, str] = {
    "left": "turn left",
    "right": "turn right",
    "forward": "move forward",
    "go forward": "move forward",
    "move ahead": "move forward",
    "go ahead": "move forward",
    "pickup": "pick up",
    "pick": "pick up",
    "put down": "drop",
    "open": "toggle",
}

_DIRECTIONS = ("east", "south", "west", "north")  # minigrid agent_dir 0..3


def available_levels() -> dict[str, str]:
    """Level name -> gymnasium id for every registered BabyAI env (e.g. ``GoToRedBall``)."""
    levels = {}
    for env_id in gym.registry:
        m = re.fullmatch(r"BabyAI-(\w+)-v(\d+)", env_id)
        if m:
            levels[m.group(1)] = env_id
    return dict(sorted(levels.items()))


def check_levels(levels: Iterable[str]) -> dict[str, str]:
    """Raise ``ValueError`` naming every unknown level and listing the valid ones.

    Returns :func:`available_levels` (level name -> gymnasium id) for the caller's use.
    """
    valid = available_levels()
    unknown = [lv for lv in levels if lv not in valid]
    if unknown:
        raise ValueError(f"unknown BabyAI level(s) {unknown}; valid levels: {', '.join(valid)}")
    return valid


def normalize_action(text: str) -> str | None:
    """Map free text to a canonical action, or None if it is not one.

    Lenient: case, surrounding punctuation and whitespace are ignored, a few aliases are
    accepted ("left", "pickup", "open", ...), and for multi-line text (a thought followed
    by the action) the last non-empty line and an ``Action: ...`` suffix are tried too.
    """
    candidates = [text]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        candidates.append(lines[-1])
    m = re.search(r"action\s*:\s*([^\n]*)\s*$", text, flags=re.IGNORECASE)
    if m:
        candidates.append(m.group(1))
    for cand in candidates:
        key = re.sub(r"\s+", " ", cand.strip().lower()).strip(" .!\"'`*")
        key = _ALIASES.get(key, key)
        if key in ACTIONS:
            return key
    return None


class BabyAITextEnv:
    """A BabyAI level as an :class:`~agentrm.envs.base.Env`.

    Args:
        level: a registered BabyAI level name such as ``GoToRedBall``, ``GoToLocal``,
            ``PickupLoc``, ``PutNextLocal``, ``OpenDoor`` (see :func:`available_levels`).
        max_steps: fixed step limit per episode; None keeps minigrid's default (64 for
            one-room levels).  It also scales the success reward.
        max_objects: at most this many objects are described per observation (those the
            mission names first, then the nearest); the rest are counted ("2 more").

    Invalid actions: the observation is feedback naming the valid actions, the reward
    is 0, and the action *consumes a step* (counts towards ``max_steps``) so that a
    policy stuck emitting garbage still terminates.

    ``clone()`` deep-copies the minigrid env together with :attr:`extras` in one
    ``copy.deepcopy`` call (about 0.3 ms), so objects in ``extras`` that reference the
    env (such as a planner bound to it) are re-bound to the copy.  This is exact: the
    env's RNG state is copied too (``clone_mode = "copy"``).  ``close()`` drops the
    minigrid env (nothing outside the process is held).

    Spec: ``babyai:<level>`` with options ``max_steps`` and ``max_objects``; BabyAI has no
    official splits, so task instances are the seeds and train/evaluation disjointness is
    checked on them (:meth:`instance_key`).
    """

    clone_mode = "copy"

    def __init__(
        self, level: str = "GoToRedBall", max_steps: int | None = None, max_objects: int = 4, rephrase: int = 0
    ):
        env_id = check_levels([level])[level]
        if not 0 <= rephrase <= len(REPHRASINGS):
            raise ValueError(f"babyai: rephrase must be 0..{len(REPHRASINGS)}, got {rephrase}")
        self.rephrase = rephrase
        kwargs: dict[str, Any] = {} if max_steps is None else {"max_steps": max_steps}
        self.level = level
        self.max_objects = max_objects
        self.env = gym.make(env_id, **kwargs).unwrapped
        self.max_steps = max_steps
        from agentrm.envs.registry import EnvSpec

        opts: dict[str, Any] = {} if max_steps is None else {"max_steps": int(max_steps)}
        if max_objects != 4:
            opts["max_objects"] = max_objects
        if rephrase:
            opts["rephrase"] = rephrase
        self.spec: EnvSpec = EnvSpec("babyai", level, "train", opts)
        self.closed = False
        self.seed: int | None = None
        self.history: list[str] = []
        """Raw action texts applied since the last reset (for replay and planners)."""
        self.last_action_id: int | None = None
        """minigrid id of the last applied action (None if it was invalid or none yet)."""
        self.done = False
        self.extras: dict[str, Any] = {}
        """Episode-local companion state (e.g. a scripted policy's planner); copied by
        :meth:`clone` together with the env and cleared by :meth:`reset`."""

    # ----------------------------------------------------------------- Env protocol
    @property
    def valid_actions(self) -> list[str]:
        """The canonical action strings."""
        return list(ACTIONS)

    @property
    def prompt_example(self) -> tuple[str, list[tuple[str, str]]]:
        """A worked episode for LM prompts: ``(instruction, [(reply, observation), ...])``.

        Replies are in the ``Thought: ...`` / ``Action: ...`` format of
        :class:`agentrm.policies.prompt.AgentPrompt`; the episode is the same for every level.
        """
        return (
            f"Mission: go to the blue key. Actions: {', '.join(ACTIONS)}.\n"
            "Facing north. Blue key 2 ahead 1 right, grey box 1 left.",
            [
                ("Thought: The blue key is ahead and to my right; I move forward first.\nAction: move forward",
                 "Facing north. Blue key 1 ahead 1 right, grey box 1 behind 1 left."),
                ("Thought: The key is now one step ahead and one to the right; I turn right.\nAction: turn right",
                 "Facing east. Blue key 1 ahead 1 left."),
                ("Thought: Moving forward puts the key directly to my left.\nAction: move forward",
                 "Facing east. Blue key 1 left."),
                ("Thought: The key is on my left; I turn left to face it.\nAction: turn left",
                 "Mission complete."),
            ],
        )

    @property
    def mission(self) -> str:
        """minigrid's mission text, e.g. ``go to the red ball``."""
        return str(self.env.mission)

    @property
    def instruction(self) -> str:
        """Mission (rewritten when the spec asks for ``rephrase``) plus the action list."""
        return f"Mission: {rephrase_mission(self.mission, self.rephrase)}. Actions: {', '.join(ACTIONS)}."

    def reset(self, seed: int) -> str:
        """Start the episode for ``seed`` and return the first observation."""
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints rejected samples
            self.env.reset(seed=int(seed))
        self.seed = int(seed)
        self.history = []
        self.last_action_id = None
        self.done = False
        self.extras = {}
        return self.describe()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply a text action.

        Returns:
            ``(observation, reward, done, info)`` with info keys ``success``, ``valid``,
            ``action`` (canonical text or None), ``truncated`` and ``steps``.

        Raises:
            RuntimeError: when called after the episode ended.
        """
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        if self.seed is None:
            raise RuntimeError("call reset() before step()")
        self.history.append(action)
        name = normalize_action(action)
        env = self.env
        if name is None:
            self.last_action_id = None
            env.step_count += 1
            truncated = env.step_count >= env.max_steps
            obs = f"Invalid action {action.strip()[:40]!r}. Valid actions: {', '.join(ACTIONS)}."
            reward, terminated = 0.0, False
        else:
            act = ACTIONS[name]
            self.last_action_id = int(act)
            before = self._signature()
            _, reward, terminated, truncated, _ = env.step(act)
            obs = self.describe()
            if self._signature() == before:
                obs = "Nothing happens. " + obs
        success = bool(terminated and reward > 0)
        self.done = bool(terminated or truncated)
        if success:
            obs = "Mission complete."
        elif self.done:
            obs += " Out of steps." if truncated else " Mission failed."
        info = {
            "success": success,
            "valid": name is not None,
            "action": name,
            "truncated": bool(truncated and not terminated),
            "steps": int(env.step_count),
        }
        return obs, float(reward), self.done, info

    def clone(self) -> BabyAITextEnv:
        """Exact, independent copy of the current state (deep copy, see class docstring)."""
        new = copy.copy(self)
        new.env, new.extras = copy.deepcopy((self.env, self.extras))
        new.history = list(self.history)
        if self.closed:
            raise RuntimeError("clone() of a closed environment")
        return new

    def canonical_action(self, text: str) -> str | None:
        """The canonical action ``text`` means (aliases, case, an ``Action:`` line), or None."""
        return normalize_action(text)

    def close(self) -> None:
        """Drop the minigrid env and planner state (idempotent)."""
        if not self.closed:
            self.env.close()
        self.closed = True
        self.extras = {}
        self.done = True

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0) -> ScriptedBabyAIPolicy:
        """minigrid's BabyAI bot with injected errors (:class:`~agentrm.envs.babyai_expert.ScriptedBabyAIPolicy`)."""
        from agentrm.envs.babyai_expert import ScriptedBabyAIPolicy

        return ScriptedBabyAIPolicy(error_rate, seed=seed)

    def instance_key(self, seed: int) -> str:
        """``babyai:<level>#seed=<seed>``: a BabyAI task instance is its level and seed."""
        return f"babyai:{self.level}#seed={int(seed)}"

    # ------------------------------------------------------------------ rendering
    def _signature(self) -> tuple:
        """State summary used to detect actions without effect."""
        env = self.env
        fwd = env.grid.get(*env.front_pos)
        return (
            tuple(int(x) for x in env.agent_pos),
            int(env.agent_dir),
            id(env.carrying),
            None if fwd is None else fwd.encode(),
        )

    def describe(self) -> str:
        """Text of what the agent currently sees (egocentric, occlusion-aware)."""
        env = self.env
        grid, vis = env.gen_obs_grid()
        size = grid.width
        ax, ay = size // 2, size - 1  # agent cell in the egocentric view, facing "up"
        head = f"Facing {_DIRECTIONS[env.agent_dir]}"
        if env.carrying is not None:
            head += f", carrying a {_name(env.carrying)}"
        parts = [head + "."]
        for j in range(ay - 1, -1, -1):  # first obstacle straight ahead
            cell = grid.get(ax, j)
            if not vis[ax, j]:
                break
            if cell is not None:
                if cell.type == "wall":
                    parts.append(f"Wall {ay - j} ahead.")
                break
        words = set(self.mission.split())
        objs = []  # mission-relevant objects first, then by distance
        for i in range(size):
            for j in range(size):
                cell = grid.get(i, j)
                if cell is None or not vis[i, j] or (i, j) == (ax, ay) or cell.type == "wall":
                    continue
                ahead, side = ay - j, i - ax
                objs.append((not _mentioned(cell, words), ahead + abs(side), ahead, side, _name(cell)))
        objs.sort()
        if objs:
            descs = []
            for _, _, ahead, side, name in objs[: self.max_objects]:
                where = ([f"{ahead} ahead"] if ahead else []) + (
                    [f"{abs(side)} {'left' if side < 0 else 'right'}"] if side else []
                )
                descs.append(f"{name} {' '.join(where)}")
            text = ", ".join(descs)
            if len(objs) > self.max_objects:
                text += f", {len(objs) - self.max_objects} more"
            parts.append(text[0].upper() + text[1:] + ".")
        else:
            parts.append("No objects in view.")
        return " ".join(parts)


def _mentioned(obj: Any, words: set[str]) -> bool:
    """Whether the mission may refer to ``obj`` (its type is named, with its colour or none)."""
    if obj.type not in words:
        return False
    return obj.color in words or not (words & set(COLOR_NAMES))


def _name(obj: Any) -> str:
    """Short description of a minigrid world object, e.g. ``red ball`` or ``locked blue door``."""
    if obj.type == "door":
        state = "open" if obj.is_open else ("locked" if obj.is_locked else "closed")
        return f"{state} {obj.color} door"
    return f"{obj.color} {obj.type}"


# Instruction perturbations (the paper's robustness study rephrases verbs and object naming): each is a
# list of whole-word substitutions applied to minigrid's mission text; the episode itself is unchanged.
REPHRASINGS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("go to", "navigate to"), ("pick up", "collect"), ("put", "place"), ("open", "swing open")),  # verbs
    (("ball", "sphere"), ("box", "crate"), ("key", "small key"), ("door", "doorway")),  # object names
    (("go to", "head over to"), ("pick up", "grab"), ("ball", "round toy"), ("box", "container")),  # both
    (("go to the", "your goal is to reach the"), ("go to a", "your goal is to reach a"),
     ("pick up the", "your goal is to lift the"), ("pick up a", "your goal is to lift a")),  # sentence form
)


def rephrase_mission(mission: str, variant: int) -> str:
    """``mission`` rewritten by perturbation ``variant`` (0: unchanged; 1..4: :data:`REPHRASINGS`)."""
    if not variant:
        return mission
    out = mission
    for old, new in REPHRASINGS[variant - 1]:
        out = re.sub(rf"\b{re.escape(old)}\b", new, out)
    return out


LEVEL_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"GoTo", "GoTo"),
    (r"Pickup|OneRoom|FindObj|UnblockPickup", "Pickup"),
    (r"Open", "Open"),
    (r"Unlock|KeyInBox|BlockedUnlockPickup|KeyCorridor", "Unlock"),
    (r"PutNext|MoveTwoAcross", "PutNext"),
    (r"Synth|BossLevel|MiniBossLevel|ActionObjDoor", "Synth"),
)
"""BabyAI level-name prefix -> family: levels of a family share their mission and the actions it needs
(GoTo: turning and moving; Pickup: also ``pick up``; Open: ``toggle``; Unlock: ``pick up`` a key and
``toggle``; PutNext: ``pick up`` and ``drop``; Synth: any of them).  The first matching prefix wins
(``BlockedUnlockPickup`` is an Unlock level)."""


def task_group(level: str) -> str | None:
    """The family of a level (``babyai Open``; :data:`LEVEL_FAMILIES`), ``None`` for a level of no family
    (for :func:`agentrm.envs.registry.task_group`)."""
    for pattern, family in LEVEL_FAMILIES:
        if re.match(pattern, level):
            return f"babyai {family}"
    return None


def make(spec: EnvSpec) -> BabyAITextEnv:
    """Registry factory: ``babyai:<level>`` with options ``max_steps`` (int), ``max_objects`` (int) and
    ``rephrase`` (0..4: the instruction perturbations of :data:`REPHRASINGS`)."""
    unknown = set(spec.options) - {"max_steps", "max_objects", "rephrase"}
    if unknown:
        raise ValueError(
            f"env spec {str(spec)!r}: unknown BabyAI option(s) {sorted(unknown)}; use max_steps, max_objects, rephrase"
        )
    max_steps = spec.option("max_steps")
    return BabyAITextEnv(
        spec.task,
        max_steps=None if max_steps is None else int(max_steps),
        max_objects=int(spec.option("max_objects", 4)),
        rephrase=int(spec.option("rephrase", 0)),
    )
