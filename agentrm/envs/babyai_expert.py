"""BabyAI's expert for data generation: minigrid's BabyAI bot with injected errors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minigrid.utils.baby_ai_bot import BabyAIBot

from agentrm.envs.babyai import ACTIONS, BabyAITextEnv
from agentrm.envs.base import NoisyExpert

if TYPE_CHECKING:
    from agentrm.envs.base import Env

_ID_TO_NAME = {int(v): k for k, v in ACTIONS.items()}
_BOT_KEY = "scripted_babyai_bot"
_NO_OP = 6  # minigrid's `done` action id: a no-op in BabyAI; reported to the bot for invalid actions


@dataclass
class _BotState:
    """The planner attached to one env state (lives in ``BabyAITextEnv.extras``)."""

    bot: BabyAIBot | None
    planned_at: int  # len(env.history) when `action` was computed
    action: str | None  # the bot's suggestion there (None: no usable suggestion)


class ScriptedBabyAIPolicy(NoisyExpert):
    """minigrid's ``BabyAIBot`` with injected errors.

    Each of the ``k`` samples is the bot's action with probability ``1 - error_rate``,
    otherwise a uniformly random *other* valid action.  Where the bot has no usable
    suggestion (it gave up, e.g. after a box it needed was opened), samples are uniform.

    Planner state: the bot keeps a plan and a map of seen cells.  It lives in
    ``env.extras`` so that ``env.clone()`` copies it along with the world (rollouts
    and branches continue with the right plan).  The bot is used in its *advising*
    mode: each new state it is told the action actually taken, so it replans after
    deviations.  If the bot cannot be advanced (it was skipped for some steps, its
    state was lost through a replay, or it raises), a fresh bot is built on the
    current state, keeping the seen-cells map when there is one.

    Deterministic given ``seed`` and the sequence of calls.

    Args:
        error_rate: probability of replacing the bot's action by another one.
        seed: seed of the sampling RNG.
    """

    def __init__(self, error_rate: float = 0.0, seed: int = 0):
        super().__init__(error_rate, seed)
        self.stats: Counter[str] = Counter()
        """Counts of planner events: ``replan``, ``fresh_bot``, ``bot_failed``."""

    def propose(self, env: Env | None, history: Any = None, k: int = 1) -> list[str]:
        """Sample ``k`` actions for ``env``'s current state (``history`` is not needed)."""
        if not isinstance(env, BabyAITextEnv):
            raise TypeError(f"ScriptedBabyAIPolicy needs a BabyAITextEnv, got {type(env).__name__}")
        return self.sample(self.expert_action(env), lambda: env.valid_actions, k)

    def expert_action(self, env: BabyAITextEnv) -> str | None:
        """The bot's suggestion for the current state (cached per state, so repeated calls agree)."""
        n = len(env.history)
        state: _BotState | None = env.extras.get(_BOT_KEY)
        if state is not None and state.planned_at == n:
            return state.action
        bot, action = None, None
        if state is not None and state.bot is not None and state.planned_at == n - 1:
            taken = env.last_action_id if env.last_action_id is not None else _NO_OP
            try:
                bot, action = state.bot, state.bot.replan(taken)
                self.stats["replan"] += 1
            except Exception:  # the bot asserts / raises when it cannot follow a deviation
                bot = None
        if bot is None:
            bot, action = self._fresh_bot(env, state)
        name = None if action is None else _ID_TO_NAME.get(int(action))
        env.extras[_BOT_KEY] = _BotState(bot=bot, planned_at=n, action=name)
        return name

    def _fresh_bot(self, env: BabyAITextEnv, old: _BotState | None) -> tuple[BabyAIBot | None, Any]:
        try:
            bot = BabyAIBot(env.env)
            if old is not None and old.bot is not None:
                bot.vis_mask |= old.bot.vis_mask
            action = bot.replan()
            self.stats["fresh_bot"] += 1
            return bot, action
        except Exception:
            self.stats["bot_failed"] += 1
            return None, None
