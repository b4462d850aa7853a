"""The JSON the server accepts: request models (pydantic, strict, unknown fields refused) and the limits.

Every refusal is one line naming the field (``items[0].candidates[2].action: Input should be a valid
string``) sent as ``{"detail": "<line>"}`` with a 4xx status. What a request can hold is text only: the
instruction, the steps (action, observation, ``withheld``) and the candidates; nothing in it names a file,
a model or a setting, and outcomes (reward, success, step values) are refused as unknown fields, so nothing
a request says can load anything or show a scorer an outcome.

Outcome-blindness travels with the data: a step whose reply was withheld from an outcome-blind scorer
(:mod:`agentrm.search.blind`) is sent as ``{"action": ..., "withheld": true}`` (observation empty or absent)
and reaches the scorer as ``Step(action, "", withheld=True)``, exactly as in process. The server never
withholds anything itself: it scores what it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentrm.data.schema import Step, Trajectory

SESSION_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line ``detail`` naming the field."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid unicode text ({e.reason} at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
_STRICT = ConfigDict(extra="forbid", strict=True)


class StepIn(BaseModel):
    """One step: the action and the environment's reply, or ``withheld: true`` and no reply."""

    model_config = _STRICT
    action: Text
    observation: Text | None = None
    withheld: bool = False

    @model_validator(mode="after")
    def _reply_or_withheld(self) -> StepIn:
        if self.withheld and self.observation:
            raise ValueError("a withheld step carries no observation (send \"\" or leave it out)")
        if not self.withheld and self.observation is None:
            raise ValueError("observation: required (or \"withheld\": true for a step whose reply is withheld)")
        return self

    def to_step(self) -> Step:
        return Step(self.action, self.observation or "", withheld=self.withheld)


class TrajectoryIn(BaseModel):
    """A trajectory or prefix: the instruction (the first user turn) and the steps so far."""

    model_config = _STRICT
    instruction: Text
    steps: list[StepIn] = Field(default_factory=list)
    id: Annotated[str, Field(max_length=200)] = "request"
    task: Annotated[str, Field(max_length=200)] = ""

    def to_trajectory(self) -> Trajectory:
        return Trajectory(self.id, self.task, self.instruction, [s.to_step() for s in self.steps], 0.0, False)


class TrajectoriesRequest(BaseModel):
    """``POST /v1/score/trajectories``."""

    model_config = _STRICT
    trajectories: Annotated[list[TrajectoryIn], Field(min_length=1)]
    return_steps: bool = False


class CandidateItem(BaseModel):
    """One prefix and its candidate next steps (a step, or a bare action string for the implicit PRM)."""

    model_config = _STRICT
    prefix: TrajectoryIn
    candidates: Annotated[list[StepIn | Text], Field(min_length=1)]


class CandidatesRequest(BaseModel):
    """``POST /v1/score/candidates``: prefixes with candidates; ``session`` keeps their prefix cache."""

    model_config = _STRICT
    items: Annotated[list[CandidateItem], Field(min_length=1)]
    session: Annotated[str, Field(pattern=SESSION_PATTERN)] | None = None


class CloseSessionRequest(BaseModel):
    """``POST /v1/sessions/close``: free a session's prefix cache."""

    model_config = _STRICT
    session: Annotated[str, Field(pattern=SESSION_PATTERN)]


@dataclass(frozen=True)
class Limits:
    """What one request may hold (each refusal names the limit)."""

    max_request_bytes: int = 4 * 2**20
    max_items: int = 64
    max_candidates: int = 256
    max_sequence_tokens: int = 16384
    max_queue: int = 64

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("StepIn", "str", "function-after[_encodable(), str]"):
            continue  # the union member pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "<body>"


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """``raw`` as an instance of ``model``; :class:`RequestError` 400 (not JSON) or 422 (first invalid field)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"<body>: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"<body>: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"<body>: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (a request holds only text to score: no files, models, settings or outcomes)"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise RequestError(422, f"{_where(err['loc'])}: {msg}{more}") from None


class TokenCounter:
    """Tokens of texts by the served model's tokenizer (no chat template), only where needed: a token covers at
    least one character, so texts of at most ``limit`` characters are within ``limit`` tokens untokenised."""

    def __init__(self, tokenizer, limit: int):
        self.tokenizer, self.limit = tokenizer, limit

    def tokens(self, texts: list[str]) -> int:
        texts = [t for t in texts if t]
        if self.tokenizer is None or not texts:
            return sum(len(t) for t in texts)
        return sum(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])


def _texts(traj: TrajectoryIn) -> list[str]:
    return [traj.instruction] + [t for s in traj.steps for t in (s.action, s.observation or "")]


def _cand_texts(c: StepIn | str) -> list[str]:
    return [c] if isinstance(c, str) else [c.action, c.observation or ""]


def _chars(texts: list[str]) -> int:
    return sum(len(t) for t in texts)


def check_limits(req: BaseModel, limits: Limits, counter: TokenCounter) -> None:
    """Refuse (422, naming the limit) what exceeds ``limits``: items, candidates, tokens per sequence (a
    trajectory; a prefix with one of its candidates)."""
    cap = limits.max_sequence_tokens
    if isinstance(req, TrajectoriesRequest):
        if len(req.trajectories) > limits.max_items:
            raise RequestError(422, f"trajectories: {len(req.trajectories)} trajectories > max_items={limits.max_items}")
        for i, t in enumerate(req.trajectories):
            texts = _texts(t)
            if _chars(texts) > cap and (n := counter.tokens(texts)) > cap:
                raise RequestError(422, f"trajectories[{i}]: {n} tokens > max_sequence_tokens={cap}")
    elif isinstance(req, CandidatesRequest):
        if len(req.items) > limits.max_items:
            raise RequestError(422, f"items: {len(req.items)} prefixes > max_items={limits.max_items}")
        total = sum(len(it.candidates) for it in req.items)
        if total > limits.max_candidates:
            raise RequestError(422, f"items: {total} candidates in all > max_candidates={limits.max_candidates}")
        for i, it in enumerate(req.items):
            base = _texts(it.prefix)
            base_chars, base_tokens = _chars(base), None
            for k, c in enumerate(it.candidates):
                own = _cand_texts(c)
                if base_chars + _chars(own) <= cap:
                    continue
                if base_tokens is None:
                    base_tokens = counter.tokens(base)
                n = base_tokens + counter.tokens(own)
                if n > cap:
                    raise RequestError(422, f"items[{i}].candidates[{k}]: prefix and candidate are {n} tokens > "
                                            f"max_sequence_tokens={cap}")
