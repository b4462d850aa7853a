"""ScienceWorld (``scienceworld`` 1.2.3, a Scala simulator in a JVM) as a text environment.

Spec: ``sciworld:<task>[@train|dev|test][?max_steps=100&simplification=easy]``.  The task is
a name (``boil``, ``find-living-thing``; see :data:`TASK_NAMES`), its index in that
alphabetical list (ScienceWorld's own ``task_num``, as in ``env.get_task_names()``), or the
paper's id (``1-1`` = boil, ``4-1`` = find-living-thing).  ``reset(seed)`` plays variation
``variations[seed % len(variations)]`` of the spec's official split, so train, dev and test
never share a variation (:meth:`ScienceWorldTextEnv.instance_key` is ``sciworld:<task>#var=<v>``).

Observations and actions are ScienceWorld's own text (``open door to kitchen``, ``focus on
blue jay``, a number answering an ``Ambiguous request``).  ``reward`` is the progress so far,
``max(score, 0) / 100`` in [0, 1]; ``info["success"]`` is task completion (score 100).  The
episode ends on completion, on failure (ScienceWorld's score -100, e.g. focusing on a
wrong object) or after ``max_steps`` calls of :meth:`~ScienceWorldTextEnv.step` (every call
counts, unparseable ones included, so a policy stuck on garbage still terminates).
Unparseable input ("No known action matches that input.") gets reward 0.0 unless it is the
episode's last step, where the reward is the episode's progress (the contract's "the final
step's reward is the episode's reward" wins); ``info["progress"]`` always has the progress.

Determinism: by default the simulator lists objects in identity-hash order, which differs
between loads and JVMs (the same actions gave differently ordered observations).  The
JVMs here run with ``-XX:hashCode=2`` (constant identity hash), which made every one of
the 30 tasks' gold paths replay to identical observations across loads and JVMs.

JVMs: each process keeps a small pool of simulator JVMs (:func:`pool`; at most
``AGENTRM_SCIWORLD_JVMS``, default 2; ~300 MB each), shut down at exit.  Environments do
not own a JVM: a JVM remembers which env state it holds, and an env whose state is held by
none is restored on one by ``load`` + replay of its actions (``clone_mode = "replay"``).
So ``clone()`` itself is free; the cost falls on the next step of whichever of original and
clone no longer has a JVM in its state.

Measured on this 2-core machine (shared), find-living-thing / boil, easy:
    * ``ScienceWorldEnv.step`` (wrapper, builds all valid actions): 40 ms / 100-350 ms per
      step; :meth:`ScienceWorldTextEnv.step` (3 bare server calls): 4-6 ms.
    * JVM start 0.6-2 s; ``load`` 30-40 ms; :attr:`valid_actions` 15-30 ms.
    * restore by replay: ~35 ms + ~4 ms per replayed step: depth 10 ~80 ms, depth 30 ~160 ms.
    * gold path generation (cached per task, variation, simplification): 0.1-5 s.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import os
import re
import shutil
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from scienceworld.constants import BASEPATH, ID2TASK, JAR_PATH

from agentrm.envs.base import NoisyExpert

if TYPE_CHECKING:
    from agentrm.envs.registry import EnvSpec

TASK_NAMES: list[str] = sorted(ID2TASK.values())
"""The 30 task names in ScienceWorld's order (``get_task_names()``): a task number indexes this."""

SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "boil": (14, 7, 9), "change-the-state-of-matter-of": (14, 7, 9), "chemistry-mix": (16, 8, 8),
    "chemistry-mix-paint-secondary-color": (18, 9, 9), "chemistry-mix-paint-tertiary-color": (18, 9, 9),
    "find-animal": (150, 75, 75), "find-living-thing": (150, 75, 75), "find-non-living-thing": (150, 75, 75),
    "find-plant": (150, 75, 75), "freeze": (14, 7, 9), "grow-fruit": (62, 31, 33), "grow-plant": (62, 31, 33),
    "identify-life-stages-1": (6, 3, 5), "identify-life-stages-2": (4, 2, 4),
    "inclined-plane-determine-angle": (84, 42, 42), "inclined-plane-friction-named-surfaces": (692, 346, 348),
    "inclined-plane-friction-unnamed-surfaces": (80, 40, 42), "lifespan-longest-lived": (62, 31, 32),
    "lifespan-longest-lived-then-shortest-lived": (62, 31, 32), "lifespan-shortest-lived": (62, 31, 32),
    "measure-melting-point-known-substance": (218, 109, 109),
    "measure-melting-point-unknown-substance": (150, 75, 75), "melt": (14, 7, 9),
    "mendelian-genetics-known-plant": (60, 30, 30), "mendelian-genetics-unknown-plant": (240, 120, 120),
    "power-component": (10, 5, 5), "power-component-renewable-vs-nonrenewable-energy": (10, 5, 5),
    "test-conductivity": (450, 225, 225), "test-conductivity-of-unknown-substances": (300, 150, 150),
    "use-thermometer": (270, 135, 135),
}  # fmt: skip
"""task -> (train, dev, test) variation counts; the splits are consecutive ranges of variation
indices (train first), as ``get_variations_train/dev/test`` return them in 1.2.3 (a test checks)."""

SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors", "noElectricalAction")
OPTIONS = ("max_steps", "simplification")
UNPARSEABLE = "No known action matches that input."
JAVA_OPTS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")  # deterministic object order (see above)
DEVIATION_EXCLUDED = ("focus on", "reset task")
"""Actions the expert never takes as a random error: a wrong focus fails the task outright, a
reset restarts it (either would end the useful part of the episode)."""

_MOVE = re.compile(r"^(?:go|teleport) to (?:the )?(.+)$")
_MOVED = re.compile(r"^You (?:move|teleport) to the (.+?)\.")
_ROOM = re.compile(r"called the (.+?)\.")


TOPICS: dict[int, str] = {
    1: "matter", 2: "measurement", 3: "electricity", 4: "classification", 5: "plants",
    6: "chemistry", 7: "lifespans", 8: "life stages", 9: "forces", 10: "genetics",
}
"""The paper's topics, by the first number of a task id (``3-1`` = power-component: topic 3, electricity)."""


def task_group(task: str) -> str | None:
    """The topic of a task (``sciworld topic 3 (electricity)``), read from its paper id in ``ID2TASK``; ``None``
    for an unknown task (for :func:`agentrm.envs.registry.task_group`)."""
    for task_id, name in ID2TASK.items():
        if name == task:
            number = int(task_id.split("-")[0])
            return f"sciworld topic {number} ({TOPICS[number]})"
    return None


def resolve_task(task: str | int) -> str:
    """Task name from a name, a number (index into :data:`TASK_NAMES`) or a paper id (``4-1``)."""
    text = str(task).strip()
    if text in SPLIT_SIZES:
        return text
    if text.isdigit() and int(text) < len(TASK_NAMES):
        return TASK_NAMES[int(text)]
    if text in ID2TASK:
        return ID2TASK[text]
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(TASK_NAMES))
    raise ValueError(f"unknown ScienceWorld task {task!r}; valid tasks (name, number or paper id 1-1..10-2): {listing}")


def variations(task: str, split: str) -> list[int]:
    """The official variation indices of ``task``'s ``split`` (train, dev or test)."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"unknown ScienceWorld split {split!r}; use train, dev or test")
    n_train, n_dev, n_test = SPLIT_SIZES[resolve_task(task)]
    start = {"train": 0, "dev": n_train, "test": n_train + n_dev}[split]
    return list(range(start, start + {"train": n_train, "dev": n_dev, "test": n_test}[split]))


def _clean(action: str) -> str:
    """The command in an action text: last non-empty line, an ``Action:`` prefix and edge punctuation removed."""
    lines = [ln for ln in str(action).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    text = re.sub(r"^\s*action\s*:\s*", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" .!\"'`*")


def _norm_room(name: str) -> str:
    return re.sub(r"^the ", "", name.strip().lower())


# ---------------------------------------------------------------------------------- JVM pool
class _Backend:
    """One simulator JVM (py4j gateway + ``PythonInterface``) and the env state it holds."""

    def __init__(self) -> None:
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

        java = shutil.which("java") or (os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "java"))
        if not os.path.exists(java):
            raise RuntimeError(
                "ScienceWorld needs a Java runtime (>= 11) and none was found (no `java` on PATH or in "
                "$JAVA_HOME): install one, e.g. `apt-get install openjdk-17-jre-headless` (scripts/setup.sh does)"
            )
        port, proc = launch_gateway(
            classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH, return_proc=True, javaopts=list(JAVA_OPTS), java_path=java
        )
        self.proc = proc
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port), java_process=proc)
        self.server = self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
        self.holds: object | None = None  # token of the env state loaded here (None: no env's)
        self.used = 0  # pool clock at last use (LRU)

    def close(self) -> None:
        try:
            self.gateway.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the JVM may be gone already
            pass
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(b"\n")  # die_on_exit: the JVM exits when its stdin says so
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            self.proc.kill()


class BackendPool:
    """The JVMs of one process, shared by all its ScienceWorld environments.

    A JVM is chosen for an env in this order: the one holding the env's exact state; one
    holding no live env's state (least recently used first); a new one while fewer than
    ``max_backends`` run; else the least recently used one.  Unless it held the state, the
    env's episode is restored there (``load`` + replay of its actions).  A lock serialises
    use from several threads.
    """

    def __init__(self, max_backends: int = 2):
        if max_backends < 1:
            raise ValueError(f"max_backends must be >= 1, got {max_backends}")
        self.max_backends = max_backends
        self.backends: list[_Backend] = []
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self.live: Counter[object] = Counter()  # env state token -> number of open envs in it
        self.stats: Counter[str] = Counter()  # started, restores, replayed_steps, gold
        self.gold: dict[tuple[str, int, str], list[str]] = {}
        self._clock = itertools.count(1)

    def acquire(self, token: object | None, start: bool = True) -> tuple[_Backend, bool]:
        """A JVM for the state ``token`` and whether it already holds it (caller holds :attr:`lock`).

        ``start=False``: reuse a running JVM (evicting a live state) rather than start one.
        """
        if token is not None:
            for b in self.backends:
                if b.holds is token:
                    b.used = next(self._clock)
                    return b, True
        idle = [b for b in self.backends if b.holds is None or self.live[b.holds] <= 0]
        if idle:
            b = min(idle, key=lambda x: x.used)
        elif len(self.backends) < self.max_backends and (start or not self.backends):
            b = _Backend()
            self.backends.append(b)
            self.stats["started"] += 1
        else:
            b = min(self.backends, key=lambda x: x.used)
        b.used, b.holds = next(self._clock), None
        return b, False

    def gold_path(self, task: str, variation: int, simplification: str) -> list[str]:
        """ScienceWorld's gold action sequence for an instance (cached)."""
        key = (task, variation, simplification)
        with self.lock:
            if key not in self.gold:
                b, _ = self.acquire(None, start=False)
                b.server.load(task, variation, simplification, True)
                self.gold[key] = [str(a) for a in b.server.getGoldActionSequence()]
                self.stats["gold"] += 1
            return self.gold[key]

    def shutdown(self) -> None:
        """Stop every JVM of the pool (envs using it restore on new JVMs when used again)."""
        with self.lock:
            for b in self.backends:
                b.close()
            self.backends = []


_POOL: BackendPool | None = None


def pool() -> BackendPool:
    """This process's pool (a forked child gets its own: JVMs are not shared across processes)."""
    global _POOL
    if _POOL is None or _POOL.pid != os.getpid():
        _POOL = BackendPool(int(os.environ.get("AGENTRM_SCIWORLD_JVMS", "2")))
    return _POOL


@atexit.register
def shutdown_pool() -> None:
    """Stop this process's JVMs (also registered with :mod:`atexit`)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.shutdown()


# ------------------------------------------------------------------------------ environment
class ScienceWorldTextEnv:
    """One ScienceWorld task (and split) as an :class:`~agentrm.envs.base.Env` (see the module docstring).

    Args:
        task: task name, number or paper id (:func:`resolve_task`).
        split: ``train``, ``dev`` or ``test``: which official variations ``reset(seed)`` plays.
        max_steps: step limit (every :meth:`step` call counts).
        simplification: ScienceWorld's simplification string (``easy``; ``""`` or ``none`` for
            none; or a comma-separated subset of :data:`SIMPLIFICATIONS`).
    """

    clone_mode = "replay"

    def __init__(self, task: str | int, split: str = "train", max_steps: int = 100, simplification: str = "easy"):
        self.task = resolve_task(task)
        self.split = split
        self.variations = variations(self.task, split)
        self.max_steps = int(max_steps)
        simp = "" if simplification in (None, "none") else str(simplification).replace(" ", "")
        bad = [s for s in simp.split(",") if s and s not in SIMPLIFICATIONS]
        if bad:
            raise ValueError(f"unknown ScienceWorld simplification(s) {bad}; use a comma-separated subset of {SIMPLIFICATIONS}")
        if "noElectricalAction" in simp and ("power-component" in self.task or "conductivity" in self.task):
            raise ValueError(f"task {self.task!r} needs electrical actions: drop noElectricalAction")
        self.simplification = simp
        self.teleport = "easy" in simp.split(",") or "teleportAction" in simp.split(",")
        from agentrm.envs.registry import EnvSpec

        opts: dict[str, Any] = {} if self.max_steps == 100 else {"max_steps": self.max_steps}
        if simp != "easy":
            opts["simplification"] = simp or "none"
        self.spec: EnvSpec = EnvSpec("sciworld", self.task, split, opts)
        self.closed = False
        self.variation: int | None = None
        self.history: list[str] = []
        """Raw action texts since the last reset (replayed to restore the state)."""
        self.done = False
        self.progress = 0.0
        self.location = ""  # current room, tracked from observations
        self.start_room = ""
        self.extras: dict[str, Any] = {}
        """Episode-local companion state (copied by :meth:`clone`, cleared by :meth:`reset`)."""
        self._task_desc = ""
        self._templates: list[str] = []
        self._token: object | None = None

    # ------------------------------------------------------------------------- internals
    def _set_token(self, token: object | None) -> None:
        live = pool().live
        if self._token is not None:
            live[self._token] -= 1
            if live[self._token] <= 0:
                del live[self._token]
        if token is not None:
            live[token] += 1
        self._token = token

    def _load(self, b: _Backend) -> str:
        b.server.load(self.task, self.variation, self.simplification, False)
        return str(b.server.step("look around"))

    def _backend(self) -> _Backend:
        """A JVM in this env's state, restored by replay if needed (caller holds the pool lock)."""
        if self.closed:
            raise RuntimeError("this ScienceWorld environment is closed")
        if self.variation is None:
            raise RuntimeError("call reset() before using the environment")
        p = pool()
        b, held = p.acquire(self._token)
        if not held:
            self._load(b)
            for action in self.history:
                if _clean(action):
                    b.server.step(_clean(action))
            p.stats["restores"] += 1
            p.stats["replayed_steps"] += len(self.history)
            b.holds = self._token
        return b

    # ---------------------------------------------------------------------- Env protocol
    def canonical_action(self, text: str) -> str | None:
        """The command ``text`` means, lower-cased (last line, ``Action:`` prefix and edge punctuation
        removed), or None when it holds none; used to deduplicate candidate actions."""
        command = _clean(text).lower()
        return command or None

    @property
    def instruction(self) -> str:
        """Task description plus the command templates ("" before the first reset: the Protocol
        check ``isinstance(env, Env)`` reads this property on Python 3.11)."""
        if self.variation is None:
            return ""
        return (
            f"{self._task_desc}\nAct with one command per step: {', '.join(self._templates)} "
            "(OBJ: an object or place you can see, e.g. 'go to kitchen', 'pick up thermometer'). "
            "Answer an 'Ambiguous request' with the number of the option you mean."
        )

    @property
    def valid_actions(self) -> list[str]:
        """Valid action-object combinations in the current state, sorted (costly: 50-130 ms); ``[]``
        before the first reset (the Protocol check reads properties)."""
        if self.variation is None and not self.closed:
            return []
        with pool().lock:
            return sorted({str(a) for a in self._backend().server.getValidActionObjectCombinations()})

    def reset(self, seed: int) -> str:
        """Start variation ``variations[seed % len(variations)]``; return the look-around text."""
        if self.closed:
            raise RuntimeError("this ScienceWorld environment is closed")
        p = pool()
        with p.lock:
            self.variation = self.variations[int(seed) % len(self.variations)]
            self.history, self.done, self.progress, self.extras = [], False, 0.0, {}
            self._set_token(object())
            b, _ = p.acquire(None)
            obs = self._load(b)
            b.holds = self._token
            self._task_desc = str(b.server.getTaskDescription())
            self._templates = [str(t) for t in b.server.getPossibleActions()]
        m = _ROOM.search(obs)
        self.start_room = self.location = _norm_room(m.group(1)) if m else ""
        return obs

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply a text action; info has ``success``, ``valid``, ``progress``, ``score``, ``failed``,
        ``truncated`` and ``steps``.

        Raises:
            RuntimeError: before reset, after the episode ended, or when closed.
        """
        if self.closed:
            raise RuntimeError("this ScienceWorld environment is closed")
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        command = _clean(action)
        with pool().lock:
            b = self._backend()
            obs = str(b.server.step(command)) if command else UNPARSEABLE
            score = float(b.server.getScore())
            completed = bool(b.server.getCompleted())
            self.history.append(action)
            self._set_token(object())
            b.holds = self._token
        moved = _MOVED.match(obs)
        if moved:
            self.location = _norm_room(moved.group(1))
        elif command == "reset task":
            self.location = self.start_room
        valid = not obs.startswith(UNPARSEABLE)
        failed = score < 0
        success = completed and score >= 1.0 - 1e-9
        truncated = not (success or failed) and len(self.history) >= self.max_steps
        self.done = success or failed or truncated
        self.progress = min(max(score, 0.0), 1.0)
        reward = self.progress if (valid or self.done) else 0.0
        info = {
            "success": success,
            "valid": valid,
            "progress": self.progress,
            "score": int(round(100 * score)),
            "failed": failed,
            "truncated": truncated,
            "steps": len(self.history),
        }
        return obs, reward, self.done, info

    def clone(self) -> ScienceWorldTextEnv:
        """Independent copy in the current state; free now, restored by replay when next used."""
        if self.closed:
            raise RuntimeError("clone() of a closed environment")
        new = copy.copy(self)
        new.history = list(self.history)
        new.extras = copy.deepcopy(self.extras)
        new._token = None
        with pool().lock:
            new._set_token(self._token)
        return new

    def close(self) -> None:
        """Release this env's claim on the pool's JVMs (idempotent; the JVMs stay for other envs)."""
        if not self.closed:
            with pool().lock:
                self._set_token(None)
        self.closed = True
        self.done = True

    def gold_path(self) -> list[str]:
        """ScienceWorld's gold action sequence for the current variation (cached per process)."""
        if self.variation is None:
            raise RuntimeError("call reset() before asking for the gold path")
        return pool().gold_path(self.task, self.variation, self.simplification)

    def expert_policy(self, error_rate: float = 0.0, seed: int = 0) -> GoldPathPolicy:
        """The gold path with injected errors (:class:`GoldPathPolicy`)."""
        return GoldPathPolicy(error_rate, seed=seed)

    def instance_key(self, seed: int) -> str:
        """``sciworld:<task>#var=<variation>`` for the variation ``reset(seed)`` plays."""
        return f"sciworld:{self.task}#var={self.variations[int(seed) % len(self.variations)]}"


# ----------------------------------------------------------------------------------- expert
class GoldPathPolicy(NoisyExpert):
    """ScienceWorld's gold path with injected errors.

    Each of the ``k`` samples is the expert action with probability ``1 - error_rate``,
    otherwise a uniformly random other valid action (never one of
    :data:`DEVIATION_EXCLUDED`).  The expert action follows the gold path: its position is
    the length of the longest greedy match of the gold path as a subsequence of the env's
    history (a pure function of the history, so clones and replays agree; no hidden state).
    Recovery: when the env is not in the room where the matched gold prefix leaves the agent
    (a deviation moved it), the expert first returns there, with ``teleport to <room>``
    where the simplification allows teleporting, else ``go to <room>`` (which works from an
    adjacent room); it does not retry a move that just failed.  Other deviations (an object
    moved, a door closed, a substance heated) are not repaired: the gold path simply goes on.

    Deterministic given ``seed``, the env's history and the sequence of calls.
    """

    def propose(self, env: Any, history: Any = None, k: int = 1) -> list[str]:
        """Sample ``k`` actions for ``env``'s current state (``history`` is not needed)."""
        if not isinstance(env, ScienceWorldTextEnv):
            raise TypeError(f"GoldPathPolicy needs a ScienceWorldTextEnv, got {type(env).__name__}")
        return self.sample(
            self.expert_action(env), lambda: [a for a in env.valid_actions if not a.startswith(DEVIATION_EXCLUDED)], k
        )

    def expert_action(self, env: ScienceWorldTextEnv) -> str:
        """The next gold action, or a move back to the room the gold path expects."""
        gold = env.gold_path()
        i, room = 0, env.start_room
        for action in env.history:
            command = _clean(action)
            if command == "reset task":
                i, room = 0, env.start_room
            elif i < len(gold) and command == gold[i]:
                moved = _MOVE.match(gold[i])
                room = _norm_room(moved.group(1)) if moved else room
                i += 1
        if i >= len(gold):
            return "look around"  # gold path used up without success (a deviation broke it)
        if room and env.location != room:
            back = f"{'teleport' if env.teleport else 'go'} to {room}"
            if not env.history or _clean(env.history[-1]) != back:
                return back
        return gold[i]


def make(spec: EnvSpec) -> ScienceWorldTextEnv:
    """Registry factory: ``sciworld:<task>[@split]`` with options ``max_steps`` (int, default 100)
    and ``simplification`` (default ``easy``)."""
    unknown = set(spec.options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"env spec {str(spec)!r}: unknown ScienceWorld option(s) {sorted(unknown)}; use {', '.join(OPTIONS)}")
    return ScienceWorldTextEnv(
        spec.task,
        split=spec.split,
        max_steps=int(spec.option("max_steps", 100)),
        simplification=spec.option("simplification", "easy"),
    )
