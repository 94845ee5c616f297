"""One benchmark run in its own process (``medslim.infer.benchmark``): segment one image with
one model and backend, write the timings as JSON. Not a user command."""
from __future__ import annotations

import time

_START = time.perf_counter()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def main(job_json: str, report_path: str) -> None:
    import torch

    from medslim.infer import RuntimeOptions, Timer, load_predictor, segment_files
    from medslim.infer.profile import profile_layers
    from medslim.load import load_model
    from medslim.measure import count_flops, count_parameters

    job = json.loads(job_json)
    imports = time.perf_counter() - _START
    options = RuntimeOptions(threads=job["threads"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    timer = Timer()
    with timer("load"):
        model = load_model(job["model"], job["fold"], job["checkpoint"])
    predictor = load_predictor(model.folder, model.fold, job["checkpoint"], backend=job["backend"], device="cpu",
                               mirroring=job["mirroring"], options=options, model=model)
    stages = {"imports": imports, **timer.seconds, **predictor.setup_seconds}
    with tempfile.TemporaryDirectory(prefix="medslim-bench-") as work:
        segment_files(predictor, [job["image"]], Path(work) / "seg.nii.gz", timer)
    stages.update(timer.seconds)
    done = time.perf_counter() - _START  # what a user waits for ends here; the rest is bookkeeping
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tiles = timer.counts.get("network", 0)
    net = model.build_network()
    shape = [1, model.num_input_channels, *model.patch_size]
    report = {"backend": predictor.backend, "stages": stages, "tiles": tiles, "patch": model.patch_size,
              "peak_rss_mb": peak_rss_mb,
              "params": count_parameters(net), "flops": count_flops(net, shape)}
    if job["profile"]:
        report["profile"] = profile_layers(predictor, net, shape)
    report["extras_seconds"] = time.perf_counter() - _START - done
    Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
