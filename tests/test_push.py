"""push: the model card, --dry_run, and the real upload code path against a local stand-in for the Hub."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from simpo_robot.deploy.push import PushConfig, TrainingInfo, run_push
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.errors import SimpoRobotError

TOKEN = "hf_test_token"
# huggingface_hub's own LFS PUT uses httpx's deprecated `data=`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
LFS_SUFFIXES = (".safetensors", ".onnx", ".png")


class HubStandIn(ThreadingHTTPServer):
    """The Hub HTTP endpoints `create_repo` + `upload_folder` call (LFS protocol, no Xet), in memory."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict] = {}  # repo_id -> {"visibility": str, "commits": [{path: bytes}]}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorised(self) -> bool:
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def do_PUT(self):  # LFS basic transfer: the object itself
        self.server.requests.append(f"PUT {self.path}")
        data = self._body()
        oid = self.path.rsplit("/", 1)[-1]
        assert hashlib.sha256(data).hexdigest() == oid
        self.server.lfs[oid] = data
        self._send(200)

    def do_POST(self):
        self.server.requests.append(f"POST {self.path.split('?')[0]}")
        path = self.path.split("?")[0]
        body = self._body()
        if not self._authorised():
            return
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.server.repos:
                return self._send(409, {"error": "You already created this model repo",
                                       "url": f"{self.server.endpoint}/{repo_id}"})
            self.server.repos[repo_id] = {"visibility": payload.get("visibility"), "commits": []}
            return self._send(200, {"url": f"{self.server.endpoint}/{repo_id}"})
        if path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])  # the header must parse
            return self._send(200, {"errors": [], "warnings": []})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return self._send(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects
            ]})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                 "shouldIgnore": False, "oid": None} for f in files
            ]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo_id = path[len("/api/models/"):].split("/commit/")[0]
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    files[item["value"]["path"]] = self.server.lfs[item["value"]["oid"]]
            self.server.repos[repo_id]["commits"].append(files)
            oid = "0" * 40
            return self._send(200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
        self._send(404, {"error": f"stand-in has no {path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The stand-in speaks the LFS protocol, not Xet (what hf_xet would use against the real Hub).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = save_tiny_policy(tmp_path_factory.mktemp("push") / "policy")
    (folder / "learning_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n fake image")
    (folder / "notes.txt").write_text("not part of the upload")
    (folder / "training_info.json").write_text(json.dumps({
        "base_model": "lerobot-fans/diffusion_fetch_push",
        "task": "fetch_push",
        "algorithm": "simpo",
        "weighting": "tanh",
        "weighting_params": {"negative_bound": -0.5},
        "env_steps": 20000,
        "success_before": {"pc_success": 42.0, "n_episodes": 100, "first_seed": 1000, "ci95": [32.8, 51.8]},
        "success_after": {"pc_success": 81.0, "n_episodes": 100, "first_seed": 1000, "ci95": [72.2, 87.5]},
        "success_after_deterministic": {"pc_success": 88.0, "n_episodes": 100, "first_seed": 1000},
        "learning_curve": "learning_curve.png",
    }))
    return folder


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_writes_the_card_and_the_lerobot_layout(policy, tmp_path):
    out = tmp_path / "dry"
    result = run_push(PushConfig(policy=policy, repo_id="me/fetch-push-simpo", dry_run=out))
    assert result.url is None
    assert sorted(p.name for p in out.iterdir()) == result.files == sorted([
        "README.md", "config.json", "learning_curve.png", "model.safetensors", "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors", "policy_preprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors", "training_info.json",
    ])
    assert (out / "model.safetensors").read_bytes() == (policy / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    header = _header(card)
    assert header["library_name"] == "lerobot" and header["license"] == "apache-2.0"
    assert header["base_model"] == "lerobot-fans/diffusion_fetch_push"
    assert {"lerobot", "robotics", "diffusion", "fetch_push", "simpo"} <= set(header["tags"])
    for text in ("| task | fetch_push |", "| algorithm | simpo |", "tanh (negative_bound=-0.5)",
                 "42.0% (95% CI 32.8-51.8) over 100 episodes, seeds 1000-1099",
                 "81.0% (95% CI 72.2-87.5) over 100 episodes, seeds 1000-1099", "![learning curve](learning_curve.png)",
                 "| success after, deterministic (x_T = 0) | 88.0% over 100 episodes, seeds 1000-1099 |"):
        assert text in card, text
    assert "before, deterministic" not in card  # not recorded: no row


def test_a_simpo_runs_critic_is_pushed_and_the_card_says_how_to_act_by_it(policy, tmp_path):
    import shutil

    from simpo_robot.rl.critic import TwinCritic, save_critic

    folder = tmp_path / "with_critic"
    shutil.copytree(policy, folder)
    save_critic(folder, TwinCritic(4, 2, (8,)), {"task": "fetch_push"})
    result = run_push(PushConfig(policy=folder, repo_id="me/fetch-push-simpo", dry_run=tmp_path / "dry"))
    assert {"critic.json", "critic.safetensors"} <= set(result.files)
    card = (tmp_path / "dry" / "README.md").read_text()
    assert "## Acting by the critic" in card and "--task fetch_push --best_of 10" in card
    plain = run_push(PushConfig(policy=policy, repo_id="me/fetch-push-simpo", dry_run=tmp_path / "plain"))
    assert "critic.json" not in plain.files and "Acting by the critic" not in (tmp_path / "plain" / "README.md").read_text()


def test_card_without_training_info(tmp_path):
    folder = save_tiny_policy(tmp_path / "bare")
    run_push(PushConfig(policy=folder, repo_id="me/bare", dry_run=tmp_path / "dry"))
    card = (tmp_path / "dry" / "README.md").read_text()
    assert "base_model" not in _header(card) and "| success after | not recorded |" in card
    assert "training_info.json" not in {p.name for p in (tmp_path / "dry").iterdir()}
    assert TrainingInfo.read(folder) is None


def test_pretrained_checkpoint_card_and_keep_mode(tmp_path):
    folder = save_tiny_policy(tmp_path / "pretrained")
    (folder / "train_info.json").write_text(json.dumps({"task": "fetch_push", "steps": 100}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# hand-written card\n")
    result = run_push(PushConfig(policy=folder, repo_id="me/pre", dry_run=tmp_path / "gen"))
    assert "train_info.json" in result.files
    card = (tmp_path / "gen" / "README.md").read_text()
    assert "| task | fetch_push |" in card and "behaviour cloning" in card and "base_model" not in _header(card)
    run_push(PushConfig(policy=folder, repo_id="me/pre", dry_run=tmp_path / "keep", card="keep"))
    assert (tmp_path / "keep" / "README.md").read_text() == (folder / "README.md").read_text()


def test_upload_is_one_commit_of_exactly_the_dry_run_files(policy, hub, tmp_path):
    run_push(PushConfig(policy=policy, repo_id="me/fetch-push-simpo", dry_run=tmp_path / "dry"))
    result = run_push(PushConfig(policy=policy, repo_id="me/fetch-push-simpo", private=True))
    assert result.url == f"{hub.endpoint}/me/fetch-push-simpo/commit/{'0' * 40}"
    repo = hub.repos["me/fetch-push-simpo"]
    assert repo["visibility"] == "private" and len(repo["commits"]) == 1
    committed = repo["commits"][0]
    assert sorted(committed) == result.files
    for name, content in committed.items():
        assert content == (tmp_path / "dry" / name).read_bytes(), name
    assert any(r.endswith(".git/info/lfs/objects/batch") for r in hub.requests)  # weights went through LFS
    # A second push to the same repo is a second commit (create_repo with exist_ok).
    run_push(PushConfig(policy=policy, repo_id="me/fetch-push-simpo"))
    assert len(repo["commits"]) == 2


def test_missing_token_is_a_clear_error(policy, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SimpoRobotError, match="no Hugging Face token.*hf auth login"):
        run_push(PushConfig(policy=policy, repo_id="me/x"))


def test_rejected_token_is_a_clear_error(policy, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(SimpoRobotError, match="refused the token \\(HTTP 401\\)"):
        run_push(PushConfig(policy=policy, repo_id="me/x"))


def test_unreachable_hub_is_a_clear_error(policy, hub, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(SimpoRobotError, match="cannot reach the Hugging Face Hub"):
        run_push(PushConfig(policy=policy, repo_id="me/x"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="USER/NAME"):
        PushConfig(policy=Path("p"), repo_id="no-slash")


def test_cli_dry_run(policy, tmp_path):
    from simpo_robot.cli import main

    out = tmp_path / "dry"
    assert main(["push", "--policy", str(policy), "--repo-id", "me/cli", "--dry-run", str(out)]) == 0
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert main(["push", "--policy", str(tmp_path / "missing"), "--repo_id", "me/cli", "--dry_run", str(out)]) == 1


def test_flow_bundle_push_to_the_hub_stand_in(hub, tmp_path):
    """A flow policy exported as a bundle: its velocity.onnx goes up with it and the card says how to load it."""
    from simpo_robot.deploy.export import ExportConfig, run_export
    from simpo_robot.deploy.testing import save_tiny_flow_policy

    policy = save_tiny_flow_policy(tmp_path / "flow", num_inference_steps=2)
    (policy / "train_info.json").write_text(json.dumps({"task": "fetch_push", "policy_type": "flow"}))
    bundle = run_export(ExportConfig(policy=str(policy), out=tmp_path / "bundle")).bundle
    result = run_push(PushConfig(policy=bundle, repo_id="me/flow-bundle"))
    committed = hub.repos["me/flow-bundle"]["commits"][0]
    assert sorted(committed) == result.files
    assert {"velocity.onnx", "deploy.json", "config.json", "model.safetensors", "train_info.json"} <= set(committed)
    assert committed["velocity.onnx"] == (bundle / "velocity.onnx").read_bytes()
    card = committed["README.md"].decode()
    assert "flow" in _header(card)["tags"] and "2 Euler steps (rectified flow)" in card
    assert 'FlowPolicy.from_pretrained("me/flow-bundle")' in card and "from simpo_robot.policies import FlowPolicy" in card
