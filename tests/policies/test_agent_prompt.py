"""The paper-style prompt through real chat templates; actions validated against the environment; invalid replies
counted, resampled and reported (never silently sent), for the HF and the OpenAI-compatible policies."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from agentrm.data.schema import Step
from agentrm.envs.registry import make_env
from agentrm.models.backbone import build_backbone
from agentrm.policies.base import start_history
from agentrm.policies.endpoint import RequestLimits
from agentrm.policies.hf import HFPolicy
from agentrm.policies.openai_compat import OpenAIChatPolicy
from agentrm.policies.prompt import AgentPrompt, ReplyStats, propose_validated, validate_reply
from tests.real_models import NAMES, real_tokenizer, tiny_config


@pytest.fixture()
def env():
    e = make_env("babyai:GoToRedBall?max_steps=8")
    obs = e.reset(1000)
    yield e, obs
    e.close()


def _history(env, obs):
    h = start_history("babyai/GoToRedBall", f"{env.instruction}\n{obs}")
    h.steps.append(Step("turn left", "Facing west. Wall 2 ahead."))
    return h


class ScriptedClient:
    """A ChatClient answering from a list, recording the messages it was sent."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def chat(self, messages, n=1, temperature=None):
        self.sent.append(messages)
        out, self.replies = self.replies[:n], self.replies[n:]
        return out


@pytest.mark.parametrize(("reply", "action", "ok"), [
    ("Thought: the ball is ahead.\nAction: Move Forward.", "move forward", True),
    ("Thought: go\nAction: forward", "move forward", True),  # the env's own alias
    ("You're now in the game of \"Mission: Go to the Red Ball\"", "You're now in the game of \"Mission: Go to the Red Ball", False),
    ("", "", False),
])
def test_validate_reply_uses_the_env(env, reply, action, ok):
    assert validate_reply(reply, env[0]) == (action, ok)


def test_validate_reply_by_valid_actions_list():
    class ListEnv:  # an environment without canonical_action: membership in valid_actions
        valid_actions = ["open door", "go north"]
    assert validate_reply("Action:  Go   North", ListEnv()) == ("go north", True)
    assert validate_reply("Action: fly", ListEnv()) == ("fly", False)


def test_invalid_replies_are_resampled_counted_and_reported(env):
    e, obs = env
    client = ScriptedClient(["I like balls.", "Action: turn right", "Action: dance", "nope", "unused"])
    stats = ReplyStats()
    got = propose_validated(client, AgentPrompt(), stats, e, _history(e, obs), k=2, max_resample=2, greedy=False)
    # slot 1 valid at once; slot 0 invalid, redrawn twice ("dance", "nope"), still invalid -> unresolved
    assert got == ["I like balls", "turn right"]
    assert (stats.replies, stats.invalid, stats.unresolved) == (4, 3, 1)
    assert client.replies == ["unused"] and [len(m) for m in client.sent] == [len(client.sent[0])] * 3
    assert stats.examples[0] == "I like balls."
    greedy = ReplyStats()  # greedy: no redraw (it would repeat), the failure is counted
    propose_validated(ScriptedClient(["prose"]), AgentPrompt(), greedy, e, _history(e, obs), 1, 2, greedy=True)
    assert (greedy.replies, greedy.invalid, greedy.unresolved) == (1, 1, 1)


@pytest.mark.parametrize("name", NAMES)
def test_react_prompt_renders_with_the_real_template(env, name):
    e, obs = env
    tok = real_tokenizer(name)
    msgs = AgentPrompt().messages(_history(e, obs), e)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # Gemma: roles alternate
    assert "Valid actions: turn left, turn right, move forward" in text
    assert "Thought: The blue key is ahead" in text  # the in-context example, with thoughts
    assert text.index("Here is an example episode") < text.index(obs) < text.find("Action: turn left", text.index(obs))
    assert text.endswith("<|im_start|>assistant\n" if name.startswith("smollm2") else "<start_of_turn>model\n")


class _TemplateServer:
    """An OpenAI-compatible endpoint that renders the request with a real chat template, then answers from a script."""

    def __init__(self, tok, replies):
        self.rendered, self.replies = [], list(replies)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.rendered.append(tok.apply_chat_template(body["messages"], tokenize=False,
                                                              add_generation_prompt=True))
                n = body.get("n", 1)
                choices = [{"index": i, "message": {"role": "assistant", "content": outer.replies.pop(0)}}
                           for i in range(n)]
                data = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("name", NAMES)
def test_openai_policy_paper_prompt(env, name):
    e, obs = env
    tok = real_tokenizer(name)
    server = _TemplateServer(tok, ["Thought: the ball is ahead.\nAction: move forward", "Sure! Let's play.",
                                   "Thought: hmm\nAction: pick up"])
    try:
        pol = OpenAIChatPolicy(server.url, name, temperature=1.0, prompt=AgentPrompt(), max_resample=2,
                               limits=RequestLimits(max_retries=0))
        assert pol.propose(e, _history(e, obs), k=2) == ["move forward", "pick up"]
        assert (pol.reply_stats.replies, pol.reply_stats.invalid, pol.reply_stats.unresolved) == (3, 1, 0)
        assert "Here is an example episode" in server.rendered[0] and "Valid actions:" in server.rendered[0]
    finally:
        server.close()


@pytest.mark.parametrize("name", NAMES)
def test_hf_policy_paper_prompt_counts_invalid_generations(env, name):
    """A random small model of the real architecture writes no valid action: every reply is counted, none is hidden."""
    e, obs = env
    tok = real_tokenizer(name)
    torch.manual_seed(0)
    model = build_backbone(config=tiny_config(name), vocab_size=len(tok), causal_lm=True)
    pol = HFPolicy(model, tok, temperature=1.0, max_new_tokens=6, prompt=AgentPrompt(), max_resample=1, seed=3)
    acts = pol.propose(e, _history(e, obs), k=2)
    s = pol.reply_stats
    valid = [e.canonical_action(a) is not None for a in acts]
    # one redraw per reply invalid in the first round: replies = 2 + first-round invalid
    assert s.invalid == (s.replies - 2) + s.unresolved
    assert s.unresolved == valid.count(False)  # what reaches the env invalid is exactly what was reported
    assert pol.generated_tokens > 0
