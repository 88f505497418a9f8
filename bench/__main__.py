"""`python -m bench [--device cpu|gpu]`: every benchmark in turn, then the README section.

Order matters: the pipeline and compute tables compare against the training rates.
"""

from __future__ import annotations

import argparse

from bench import infer_speed, macs, memory, pipeline_speed, profile_infer, report, train_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    device = ["--device", parser.parse_args().device]
    train_speed.main(device)
    infer_speed.main(device)
    pipeline_speed.main(device)
    macs.main(device)
    if device[1] == "cpu":  # peak RSS is host memory; on a GPU the device memory matters
        memory.main([])
        profile_infer.main(["--models", "mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
    report.main()


if __name__ == "__main__":
    main()
