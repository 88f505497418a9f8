"""`python -m bench [--device cpu|gpu]`: every benchmark in turn, then the README section.

Order matters: the pipeline and compute tables compare against the training rates.
"""

from __future__ import annotations

import argparse

from bench import (
    first_step,
    infer_speed,
    macs,
    memory,
    pipeline_speed,
    profile_infer,
    profile_memory,
    quickstart,
    report,
    train_speed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    device = ["--device", parser.parse_args().device]
    train_speed.main(device)
    # Small inputs, where per-op overhead sets the pace (#20). Ten steps per timing: one step of
    # 40-160 ms, timed alone right after the other model's, varied by up to 2x.
    train_speed.main([*device, "--sizes", "64", "32", "--steps", "10", "--repeats", "5",
                      "--out", "train_small"])
    infer_speed.main(device)
    v2 = ["--models", "mobilevitv2_050", "mobilevitv2_100", "mobilevitv2_200"]
    train_speed.main([*device, *v2, "--sizes", "128", "--batch", "16", "--repeats", "2",
                      "--out", "train_v2"])
    infer_speed.main([*device, *v2, "--batches", "1", "--out", "infer_v2"])
    pipeline_speed.main(device)
    macs.main(device)
    if device[1] == "cpu":  # peak RSS is host memory; on a GPU the device memory matters
        memory.main([])
        profile_memory.main([])
        first_step.main([])
        quickstart.main([])
        profile_infer.main(["--models", "mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
    report.main()


if __name__ == "__main__":
    main()
