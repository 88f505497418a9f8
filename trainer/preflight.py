"""What a run needs from outside this machine (downloads, a wandb login), checked before
TensorFlow starts: offline fails in seconds, with one line.

Without this, an offline machine learns it only after TensorFlow has started and the libraries
have retried (huggingface_hub alone backs off for about 25 s). Here every URL a run needs is
probed at once, in parallel, with a short timeout, and one line says what could not be fetched,
what to fetch where there is internet, and which config key points at a local copy.

Hand-written because neither TFDS nor huggingface_hub offers a "would this download, and can it?"
check; both only try. The URLs come from the libraries' own data (TFDS' checksum files,
huggingface_hub's endpoint), read without importing TensorFlow.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HUB_REPO = "timm/{name}.cvnets_in1k"  # ImageNet-1k weights of apple/ml-cvnets, in timm's naming
HUB_FILE = "model.safetensors"
PROBE_TIMEOUT_S = 3.0  # DNS, connect and first answer of one probe


class PreflightError(RuntimeError):
    """Something the run needs from outside (a download, a login) is not there; one line."""


@dataclass(frozen=True)
class Need:
    what: str  # "TFDS dataset tf_flowers"
    urls: tuple[str, ...]
    advice: str  # what to do instead, naming the config key of a local copy
    blocked: str | None = None  # why it must not even be tried (the library's offline switch)


# --------------------------------------------------------------------------- what a run needs


def tfds_data_dir(data_dir: str | None) -> Path:
    """The directory TFDS prepares into: data.data_dir, else $TFDS_DATA_DIR, else its default."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR")
                or Path.home() / "tensorflow_datasets").expanduser()


def tfds_prepared(name: str, data_dir: str | None) -> bool:
    """A prepared TFDS dataset has `<data_dir>/<name>/[<config>/]<version>/dataset_info.json`."""
    root = tfds_data_dir(data_dir) / name
    return any(root.glob("*/dataset_info.json")) or any(root.glob("*/*/dataset_info.json"))


def tfds_urls(name: str) -> tuple[str, ...]:
    """The URLs TFDS downloads for `name`, from the checksum file its package ships."""
    spec = importlib.util.find_spec("tensorflow_datasets")  # finds the package, imports nothing
    if spec is None or not spec.submodule_search_locations:
        return ()
    package = Path(list(spec.submodule_search_locations)[0])
    candidates = [package / "url_checksums" / f"{name}.txt",
                  *package.glob(f"*/{name}/checksums.tsv")]
    for path in candidates:
        if path.is_file():
            return tuple(line.split("\t")[0] for line in path.read_text().splitlines()
                         if line.strip() and not line.startswith("#"))
    return ()


def tfds_advice(name: str, data_dir: str | None) -> str:
    """What to do when TFDS `name` cannot be downloaded here."""
    return (f"where there is internet run `tfds build {name} --data_dir DIR` (or this command), "
            f"copy DIR here and set data.data_dir=DIR (now {tfds_data_dir(data_dir)})")


def hub_url(name: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{HUB_REPO.format(name=name)}/resolve/main/{HUB_FILE}"


def hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(HUB_REPO.format(name=name), HUB_FILE), str)


def needs(data_cfg, model_cfg) -> list[Need]:
    """What this data and model config will download (nothing already on disk)."""
    out = []
    if (data_cfg.source == "tfds" and data_cfg.download and not data_cfg.mock_examples
            and not tfds_prepared(data_cfg.tfds_name, data_cfg.data_dir)):
        name = data_cfg.tfds_name
        out.append(Need(f"TFDS dataset {name}", tfds_urls(name),
                        tfds_advice(name, data_cfg.data_dir)))
    if model_cfg.pretrained == "imagenet" and not hub_cached(model_cfg.name):
        out.append(Need(
            f"the ImageNet weights of {model_cfg.name}", (hub_url(model_cfg.name),),
            f"where there is internet fetch {hub_url(model_cfg.name)}, then set "
            f"model.pretrained=/path/to/{HUB_FILE} (or model.pretrained=none to train from "
            f"scratch)",
            "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
            else None))
    return out


# --------------------------------------------------------------------------- probing


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if `url`'s server answers (any HTTP status), else why not. Honours *_proxy."""
    result: list[str | None] = []
    silent = f"no answer within {timeout:g} s"

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            result.append(None)
        except urllib.error.HTTPError:  # an answer, even 403/404: the network is there
            result.append(None)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            result.append(silent if isinstance(reason, TimeoutError)  # urlopen's own timeout
                          else str(reason) or type(e).__name__)

    # A thread bounds name resolution too, which urlopen's timeout does not cover.
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else silent


def check_downloads(configs: list[tuple]) -> None:
    """Raise PreflightError (one line) if anything these (data, model) configs would download
    cannot be reached; each URL is probed once, however many sweep trials need it."""
    wanted = list(dict.fromkeys(n for data_cfg, model_cfg in configs
                                for n in needs(data_cfg, model_cfg)))
    urls = {u for need in wanted if not need.blocked for u in need.urls}
    reasons: dict[str, str | None] = {}
    threads = [threading.Thread(target=lambda u=u: reasons.__setitem__(u, probe(u)))
               for u in urls]  # in parallel: the slowest probe bounds the wait
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = []
    for need in wanted:
        bad = [(u, need.blocked or reasons.get(u)) for u in need.urls
               if need.blocked or reasons.get(u)]
        if bad:
            url, reason = bad[0]
            failures.append(f"cannot download {need.what}: {url} ({reason}); {need.advice}")
    if failures:
        raise PreflightError(" | ".join(failures))


# --------------------------------------------------------------------------- this machine


def nvidia_gpu_present(device: str = "/dev/nvidia0") -> bool:
    """Whether the machine has an NVIDIA GPU, as its driver shows it (device node, nvidia-smi);
    known without TensorFlow, which may not see it (a CPU-only build, missing CUDA libraries)."""
    return Path(device).exists() or shutil.which("nvidia-smi") is not None


# --------------------------------------------------------------------------- credentials

WANDB_LOGIN_HELP = ("run `wandb login` or set WANDB_API_KEY, or log offline with "
                    "logger.mode=offline (and `wandb sync` later)")


def check_wandb_login(logger_cfg) -> None:
    """An online wandb logger needs credentials; without them wandb.init raises mid-start-up."""
    if logger_cfg.name != "wandb" or logger_cfg.mode != "online":
        return
    from wandb.sdk.lib.wbauth import authenticate  # wandb's own lookup: env, .netrc, settings

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if authenticate.authenticate_session(host=host, source="trainer", prompt=False,
                                         update_session=False) is None:
        raise PreflightError(f"logger=wandb logger.mode=online: no wandb API key for {host}; "
                            f"{WANDB_LOGIN_HELP}")


def check(cfgs: list) -> None:
    """Everything the composed run configs need from outside this machine, before TensorFlow."""
    for cfg in cfgs:
        check_wandb_login(cfg.logger)
    check_downloads([(cfg.data, cfg.model) for cfg in cfgs])
