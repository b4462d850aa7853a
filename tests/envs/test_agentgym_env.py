"""AgentGymEnv against a local toy server speaking AgentGym's env-server API (127.0.0.1, ephemeral port)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from agentrm.envs.agentgym import AgentGymEnv, AgentGymError
from agentrm.envs.base import Env


class CountingGame:
    """Reach ``target = 3 + data_idx % 3`` by actions "inc" / "dec"; "stop" ends the episode."""

    def __init__(self, data_idx: int = 0):
        self.target, self.count, self.done = 3 + data_idx % 3, 0, False

    def obs(self) -> str:
        return f"Count to {self.target}. Current count: {self.count}."

    def step(self, action: str) -> dict:
        if action == "inc":
            self.count += 1
        elif action == "dec":
            self.count -= 1
        elif action == "stop":
            self.done = True
        else:
            return {"observation": f"Unknown action {action!r}. {self.obs()}", "reward": 0.0, "done": False}
        reward = 1.0 if (self.done and self.count == self.target) else 0.0
        return {"observation": self.obs(), "reward": reward, "done": self.done, "score": reward}


def make_server(fail_first: int = 0):
    envs: dict[int, CountingGame] = {}
    state = {"fail": fail_first, "closed": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, obj, code: int = 200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/observation":
                self._send(envs[int(parse_qs(url.query)["id"][0])].obs())
            else:
                self._send({"detail": "Not Found"}, 404)

        def do_POST(self):
            if state["fail"] > 0:  # transient server error, to exercise retries
                state["fail"] -= 1
                return self._send({"detail": "busy"}, 503)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            path = urlparse(self.path).path
            if path == "/create":
                i = len(envs)
                envs[i] = CountingGame()
                return self._send({"id": i, "observation": envs[i].obs(), "done": False, "reward": 0})
            if path == "/reset":
                envs[body["id"]] = CountingGame(body["data_idx"])
                return self._send(
                    {"id": body["id"], "observation": envs[body["id"]].obs(), "done": False, "reward": 0}
                )
            if path == "/step":
                if body["id"] not in envs:
                    return self._send({"error": f"The id {body['id']} is not valid."})
                return self._send(envs[body["id"]].step(body["action"]))
            if path == "/close":
                state["closed"].append(body["id"])
                return self._send({"closed": True})
            self._send({"detail": "Not Found"}, 404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


@pytest.fixture()
def server():
    srv, state = make_server()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


def test_episode_and_protocol(server):
    url, state = server
    env = AgentGymEnv(url, "counting", timeout=5, valid_actions=["inc", "dec", "stop"])
    assert isinstance(env, Env)
    obs = env.reset(1)
    assert obs == "Count to 4. Current count: 0." and env.instruction == obs
    for _ in range(4):
        obs, r, done, info = env.step("inc")
        assert r == 0 and not done
    assert env.observation() == "Count to 4. Current count: 4."
    obs, r, done, info = env.step("stop")
    assert (r, done, info["success"], info["score"]) == (1.0, True, True, 1.0)
    env.close()
    assert env.env_id in state["closed"]


def test_unknown_action_is_feedback_not_error(server):
    env = AgentGymEnv(server[0], timeout=5)
    env.reset(0)
    obs, r, done, info = env.step("jump")
    assert "Unknown action" in obs and r == 0 and not done and info["success"] is False


def test_clone_replays_and_is_independent(server):
    env = AgentGymEnv(server[0], timeout=5)
    env.reset(2)  # target 5
    env.step("inc")
    env.step("inc")
    twin = env.clone()
    assert twin.env_id != env.env_id and twin.actions == ["inc", "inc"]
    assert twin.step("inc")[0] == "Count to 5. Current count: 3."
    assert env.step("dec")[0] == "Count to 5. Current count: 1."
    assert twin.observation() == "Count to 5. Current count: 3."


def test_retries_transient_errors():
    srv, state = make_server(fail_first=2)
    try:
        env = AgentGymEnv(f"http://127.0.0.1:{srv.server_address[1]}", timeout=5, max_retries=3, backoff=0.01)
        assert env.reset(0).startswith("Count to 3")
        assert state["fail"] == 0
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_error_payload_raises(server):
    env = AgentGymEnv(server[0], timeout=5)
    env.reset(0)
    env.env_id = 999
    with pytest.raises(AgentGymError, match="not valid"):
        env.step("inc")


def test_dead_server_names_url():
    srv, _ = make_server()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    env = AgentGymEnv(url, "counting", timeout=2, max_retries=1, backoff=0.01)
    env.reset(0)
    srv.shutdown()
    srv.server_close()  # the server dies mid-episode
    with pytest.raises(AgentGymError, match=rf"{url}/step is not reachable after 2 attempt"):
        env.step("inc")
    with pytest.raises(AgentGymError, match="not reachable"):
        AgentGymEnv(url, timeout=2, max_retries=0)
