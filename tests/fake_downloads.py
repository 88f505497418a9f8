"""`python -m trainer` with the network replaced by local files (the one boundary crossed here).

usage: python tests/fake_downloads.py ARCHIVE_DIR [trainer overrides...]

Each URL a TFDS builder downloads is answered with ARCHIVE_DIR/<last part of the URL>, as TFDS'
own `DatasetBuilderTestCase` answers with its dummy data: `DownloadManager.download` and the
download half of `download_and_extract` are replaced; extraction, archive iteration and the
builder's whole preparation run for real. The trainer's preflight probe sees those URLs as
reachable. A URL with no file is a download failure, as TFDS reports one.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    archives = Path(sys.argv[1])
    sys.argv = ["trainer", *sys.argv[2:]]
    import tensorflow_datasets as tfds
    from etils import epath

    from trainer.run import preflight

    def local(url) -> epath.Path:
        url = str(getattr(url, "url", url))
        path = archives / url.rstrip("/").rsplit("/", 1)[-1]
        if not path.is_file():
            raise tfds.download.DownloadError(f"Failed to get url {url}. HTTP code: 404.")
        return epath.Path(path)

    manager = tfds.download.DownloadManager
    manager.download = lambda self, urls: tfds.core.utils.map_nested(local, urls)
    manager.download_and_extract = (
        lambda self, urls: self.extract(tfds.core.utils.map_nested(local, urls)))
    probe = preflight.probe
    preflight.probe = lambda url, *a, **k: (None if (archives / url.rsplit("/", 1)[-1]).is_file()
                                            else probe(url, *a, **k))

    from trainer.__main__ import main as trainer_main

    trainer_main()


if __name__ == "__main__":
    main()
