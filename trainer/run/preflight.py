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

import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from trainer.data.files import tfds_advice, tfds_prepared, tfds_urls
from trainer.errors import PreflightError
from trainer.models.presets import HUB_FILE, hub_repo, hub_url, preset

PROBE_TIMEOUT_S = 3.0  # DNS, connect and first answer of one probe


@dataclass(frozen=True)
class Need:
    what: str  # "TFDS dataset tf_flowers"
    urls: tuple[str, ...]
    advice: str  # what to do instead, naming the config key of a local copy
    blocked: str | None = None  # why it must not even be tried (the library's offline switch)


# --------------------------------------------------------------------------- what a run needs


def hub_cached(name: str, source: str = "imagenet") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_repo(name, source), HUB_FILE), str)


def needs(data_cfg, model_cfg) -> list[Need]:
    """What this data and model config will download (nothing already on disk)."""
    out = []
    if (data_cfg.source == "tfds" and data_cfg.download and not data_cfg.mock_examples
            and not tfds_prepared(data_cfg.tfds_name, data_cfg.data_dir)):
        name = data_cfg.tfds_name
        out.append(Need(f"TFDS dataset {name}", tfds_urls(name),
                        tfds_advice(name, data_cfg.data_dir)))
    name, source = model_cfg.name, model_cfg.pretrained
    if source in preset(name).weights and not hub_cached(name, source):
        url = hub_url(name, source)
        out.append(Need(
            "the ImageNet weights of " + name + ("" if source == "imagenet" else f" ({source})"),
            (url,),
            f"where there is internet fetch {url}, then set "
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
