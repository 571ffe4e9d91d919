"""Sharing a finished run: `atdiff card` (the model card's content, and its snippets run as written)
and `atdiff push` against huggingface_hub's real upload code, with the Hub answered in memory at the
HTTP layer; bad input is one line, and nothing reaches the Hub."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import shutil

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http

from assets import needs_fid_assets
from atdiff.cli import main
from atdiff.hub import model_card, read_run
from atdiff.eval.training_eval import TrainingEvaluator
from atdiff.pipelines import ImageDiffusionPipeline
from atdiff.training import train
from atdiff.training.run_dir import LOCK_NAME
from test_training import one_thread, tiny  # noqa: F401 (one_thread: an autouse fixture)

pytestmark = needs_fid_assets  # a tiny run with evals: Fashion-MNIST and the Inception weights
REPO = "someone/tiny-atconv"
LICENSES = ("apache-2.0", "mit", "cc-by-4.0")  # a few of the ids the Hub accepts
COMMIT = "1" * 40  # the fake Hub's one commit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with TensorBoard, sample grids and two FID/KID evals."""
    out = tmp_path_factory.mktemp("hub") / "tiny-atconv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATDIFF_CACHE", str(out.parent / "cache"))  # reference statistics: not the user's cache
        train(tiny(out, log_with="tensorboard", eval_every=3, eval_num_images=4, eval_num_real=8), evaluator=TrainingEvaluator)
    return out


# ------------------------------------------------------------------------------------------------
# The card
# ------------------------------------------------------------------------------------------------


def test_card_says_which_settings_changed_on_resume(run, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(run, changed)
    stats = json.loads((changed / "training_stats.json").read_text())
    stats["config_history"] = [{"step": 3, "changed": {"training.learning_rate": {"from": 0.002, "to": 0.0005}}}]
    (changed / "training_stats.json").write_text(json.dumps(stats))
    assert "changed on resume: at step 3 training.learning_rate 0.002 -> 0.0005" in str(model_card(read_run(changed)))
    assert "changed on resume" not in str(model_card(read_run(run)))


def test_card_says_what_the_model_is(run):
    stats = json.loads((run / "training_stats.json").read_text())
    card = ModelCard(str(model_card(read_run(run), REPO, "apache-2.0")))
    assert card.data.library_name == "atdiff" and card.data.license == "apache-2.0"
    assert {"atdiff", "diffusers", "atconv", "diffusion"} <= set(card.data.tags)
    assert card.data.pipeline_tag is None  # class-conditional: not unconditional-image-generation
    text = card.text
    assert text.lstrip().startswith("# tiny-atconv\n") and "class-conditional (10 classes)" in text
    for fact in ["`DiTModel`", f"{stats['params']:,} parameters", "atconv (kernel 3, 1d pooling, inhibition on)",
                 "flow matching", "fashion-mnist (test split), 32x32, 1 channel", "6 steps of 8 images (48 images seen)"]:
        assert fact in text, fact
    # every eval, with its settings
    assert [e["step"] for e in stats["evals"]] == [3, 6]
    for e in stats["evals"]:
        assert f"| {e['step']} | {e['fid']:.2f} | {1e3 * e['kid_mean']:.2f} ± {1e3 * e['kid_std']:.2f} | 4 | 8 | `FlowMatchEulerDiscreteScheduler`, 2 steps, guidance 1 |" in text
    assert "fashion-mnist:test@32" in text and "inception-v3-compat" in text
    # the final sample grid, linked relative to the folder it sits in
    [grid] = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert grid == "samples/step-0000006.png" and (run / grid).is_file()
    assert f'ImageDiffusionPipeline.from_pretrained(snapshot_download("{REPO}"))' in text
    assert f'DiffusionPipeline.from_pretrained(snapshot_download("{REPO}"), trust_remote_code=True)' in text


def test_atdiff_card_writes_the_card_whose_snippets_run(run, tmp_path, monkeypatch, capsys):
    """The card of a local run loads it as written: each Python block is run, then the command."""
    folder = tmp_path / "tiny-atconv"
    shutil.copytree(run, folder)
    assert main(["card", str(folder)]) == 0
    text = (folder / "README.md").read_text()
    assert text == str(model_card(read_run(folder)))
    python, bash = code_blocks(text, "python"), code_blocks(text, "bash")
    assert len(python) == 2 and len(bash) == 1
    for block in python:
        scope = {}
        exec(block, scope)
        assert scope["pipe"].model.config.token_mixer == "atconv"
    assert scope["pipe"].__class__ is ImageDiffusionPipeline  # diffusers' loader, through the folder's pipeline.py
    monkeypatch.chdir(tmp_path)
    [command] = bash[0].splitlines()
    assert main(shlex.split(command)[1:]) == 0 and (tmp_path / "samples.png").is_file()


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)


# ------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------


class FakeHub:
    """The Hub's side of ``create_repo``, ``model_info`` and ``create_commit`` (preupload, the LFS batch
    API and its PUTs, the commit), kept in memory: huggingface_hub runs its own code up to the socket."""

    def __init__(self):
        self.requests: list[httpx2.Request] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content PUT to the LFS store

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        method, path = request.method, request.url.path
        if (method, path) == ("POST", "/api/repos/create"):
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}"
            url = f"https://huggingface.co/{repo}"
            if repo in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": url})
            self.repos[repo] = {"private": body.get("visibility") == "private", "files": {}}
            return httpx2.Response(200, json={"url": url, "name": repo})
        if method == "GET" and path.startswith("/api/models/"):  # repo info, file tree
            repo, _, rest = path.removeprefix("/api/models/").partition("/revision/")
            repo, _, tree = repo.partition("/tree/")
            if repo not in self.repos:
                return httpx2.Response(404, json={"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
            files = self.repos[repo]["files"]
            if tree:
                return httpx2.Response(200, json=[{"type": "file", "path": name, "size": len(content), "oid": git_blob_id(content)}
                                                  for name, content in sorted(files.items())])
            return httpx2.Response(200, json={"id": repo, "private": self.repos[repo]["private"], "sha": COMMIT,
                                              "siblings": [{"rfilename": name} for name in sorted(files)]})
        if method in ("HEAD", "GET") and "/resolve/" in path:  # a file download
            repo, _, name = path.strip("/").partition("/resolve/")
            name = name.partition("/")[2]
            content = self.repos.get(repo, {}).get("files", {}).get(name)
            if content is None:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob_id(content)}"', "Content-Length": str(len(content))}
            return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else content)
        if (method, path) == ("POST", "/api/validate-yaml"):  # the card's metadata, checked before any upload
            license = ModelCard(json.loads(request.content)["content"]).data.license
            if license not in (None, *LICENSES):
                return httpx2.Response(400, json={"errors": [{"message": f'"license" must be one of [{", ".join(LICENSES)}, ...]'}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if method == "POST" and path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            # as the Hub decides: binary weights and images go to LFS, text is committed inline
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png")) else "regular", "shouldIgnore": False}
                for f in files]})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"https://lfs.example/{o['oid']}"}}}
                for o in objects]})
        if method == "PUT" and request.url.host == "lfs.example":
            self.lfs[path.strip("/")] = request.read()
            return httpx2.Response(200)
        if method == "POST" and path.endswith("/commit/main"):
            repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
            for line in request.read().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    self.repos[repo]["files"][item["value"]["path"]] = self.lfs[item["value"]["oid"]]
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{COMMIT}", "commitOid": COMMIT})
        return httpx2.Response(404, json={"error": f"the fake Hub has no {method} {path}"})


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's HTTP client with the fake Hub as its transport (its own request hook kept)."""
    fake = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # hf_xet uploads from Rust, beneath the HTTP layer replaced here: take the LFS protocol, which the Hub speaks too.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake), event_hooks={"request": [_http.hf_request_event_hook]}))
    yield fake
    huggingface_hub.set_client_factory(_http.default_client_factory)


def test_push_uploads_the_pipeline_with_its_card(run, hub, tmp_path, capsys):
    assert main(["push", str(run), REPO, "--private", "--token", "hf_test", "--license", "apache-2.0"]) == 0
    assert f"https://huggingface.co/{REPO}/commit/" in capsys.readouterr().out
    assert hub.repos[REPO]["private"]
    assert all(r.headers["authorization"] == "Bearer hf_test" for r in hub.requests if r.method == "POST" and r.url.host == "huggingface.co")
    files = hub.repos[REPO]["files"]
    assert sorted(files) == ["README.md", "config.yaml", "model/config.json", "model/diffusion_pytorch_model.safetensors", "model_index.json",
                             "pipeline.py", "samples/step-0000006.png", "scheduler/scheduler_config.json", "training_stats.json"]
    for name, content in files.items():
        if name != "README.md":
            assert content == (run / name).read_bytes(), name
    weights = (run / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert hub.lfs[hashlib.sha256(weights).hexdigest()] == weights  # through the LFS protocol
    assert files["README.md"].decode() == str(model_card(read_run(run), REPO, "apache-2.0"))

    # What the card tells a user to do with a download of the repo works on exactly what was uploaded.
    download = tmp_path / "tiny-atconv"
    for name, content in files.items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(content)
    pipe = ImageDiffusionPipeline.from_pretrained(download)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 32, 32)
    assert main(["sample", str(download), "--num-images", "4", "--out", str(tmp_path / "grid.png")]) == 0


def test_the_cards_snippets_load_the_pushed_repo(run, hub, tmp_path, monkeypatch):
    """Each way the card gives to load the model from the Hub runs as written: snapshot_download, diffusers'
    DiffusionPipeline with trust_remote_code, and `hf download` then `atdiff sample`."""
    assert main(["push", str(run), REPO, "--token", "hf_test"]) == 0
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # not the user's Hub cache
    monkeypatch.chdir(tmp_path)
    card = hub.repos[REPO]["files"]["README.md"].decode()
    python, [bash] = code_blocks(card, "python"), code_blocks(card, "bash")
    for block in python:
        scope = {}
        exec(block, scope)
        assert scope["pipe"].model.config.token_mixer == "atconv" and type(scope["pipe"]) is ImageDiffusionPipeline
    download, sample = [shlex.split(line) for line in bash.splitlines()]
    assert download[:2] == ["hf", "download"]
    from huggingface_hub.cli.hf import app  # the `hf` command, run here so that it meets the fake Hub

    app(download[1:], standalone_mode=False)
    assert main(sample[1:]) == 0 and (tmp_path / "samples.png").is_file()


def test_push_into_an_existing_public_repo_refuses_private(run, hub, capsys):
    hub.repos[REPO] = {"private": False, "files": {}}
    assert main(["push", str(run), REPO, "--private", "--token", "hf_test"]) == 2
    assert "already exists and is public" in capsys.readouterr().err
    assert hub.repos[REPO]["files"] == {}


@pytest.mark.parametrize("case", ["unfinished run", "not a run", "invalid repo id", "no namespace", "no token", "offline", "license"])
def test_bad_input_is_one_line_and_uploads_nothing(run, hub, tmp_path, monkeypatch, capsys, case):
    folder, repo, token = run, REPO, ["--token", "hf_test"]
    if case == "unfinished run":  # training still running or stopped: a lock file and a checkpoint, no pipeline
        folder = tmp_path / "unfinished"
        folder.mkdir()
        (folder / LOCK_NAME).touch()
        shutil.copytree(run / "checkpoint-3", folder / "checkpoint-3")
    elif case == "not a run":
        folder = tmp_path
    elif case == "invalid repo id":
        repo = "someone/tiny atconv"
    elif case == "no namespace":
        repo = "tiny-atconv"
    elif case == "no token":
        token = []
        for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # nor one `hf auth login` stored
    elif case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case == "license":  # refused by the Hub, after the repo is made but before any file is sent
        token += ["--license", "apache"]
    expected = {"unfinished run": "without its final pipeline", "not a run": "no model_index.json",
                "invalid repo id": "not a valid Hub repo id", "no namespace": "USER/tiny-atconv",
                "no token": "hf auth login", "offline": "HF_HUB_OFFLINE", "license": '"license" must be one of'}[case]
    assert main(["push", str(folder), repo, *token]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("atdiff push: error:") and expected in error, error
    if case == "license":
        assert hub.repos[REPO]["files"] == {} and not hub.lfs
    else:
        assert hub.requests == []


def test_card_of_an_unfinished_run_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    folder = tmp_path / "unfinished"
    folder.mkdir()
    (folder / LOCK_NAME).touch()
    assert main(["card", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "without its final pipeline" in error
    assert [p.name for p in folder.iterdir()] == [LOCK_NAME]
