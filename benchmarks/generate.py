"""Generation throughput: fabricatord against a naive generator and this machine's disk, in one run.

    .venv/bin/python benchmarks/generate.py [--slices 500] [--big 2000] [--repeat 3] [--json OUT]

Cases, each in a fresh process (so peak RSS is its own) and a fresh data_dir:
- `ct`: a CT study of --slices 512×512 slices through `fabricatord generate`'s own code path
  (render, encode, temporary file, fsync, rename, index commit);
- `ct-big`: the same with --big slices, to show memory stays flat;
- `cr`: a two-view chest CR (2140×1760);
- `naive`: the baseline a first attempt would write: per slice a fresh pydicom Dataset, a Pillow
  image with the same text, `dcmwrite` to a folder (no fsync, no index);
- `disk`: the machine's sequential write speed for CT-sized files with an fsync each.
Ratios are what to compare: the machine is shared and absolute figures drift between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_SLICES_PER_SECOND = 400
GOAL_RATIO_TO_NAIVE = 2.0


def _generate(modality: str, images: int, work: Path) -> dict[str, Any]:
    from fabricatord.config import load
    from fabricatord.db import InstanceIndex, open_database
    from fabricatord.dicom.storage import InstanceWriter
    from fabricatord.workflow.generation import GenerateOptions, StudyGenerator

    config = work / "fabricatord.toml"
    config.write_text('[node]\ndata_dir = "data"\n[synth]\nseed = 1\n')
    settings = load(config, environ={})
    database = open_database(settings.database_url)
    writer = InstanceWriter(InstanceIndex(database), settings.storage_dir, settings.tmp_dir)
    generator = StudyGenerator(settings, database, writer)
    started = time.perf_counter()
    study = generator.generate(GenerateOptions(modality=modality, images=images))
    seconds = time.perf_counter() - started
    return {"instances": len(study.files), "bytes": study.bytes, "seconds": seconds}


def _naive(slices: int, work: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    font = ImageFont.load_default(size=15)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    total = 0
    started = time.perf_counter()
    for index in range(slices):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^John", "PID1", "19700101", "M"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261123", "120000", "2026AB0000001", "1"
        ds.ReferringPhysicianName, ds.StudyDescription, ds.Modality, ds.SeriesNumber = "", "CT CHEST", "CT", "1"
        ds.InstanceNumber, ds.ImageType, ds.PatientPosition = str(index + 1), ["ORIGINAL", "PRIMARY", "AXIAL"], "HFS"
        ds.ImagePositionPatient = ["-179.2", "-179.2", f"{index * 2.5:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing, ds.SliceThickness, ds.KVP = ["0.7", "0.7"], "2.5", "120"
        ds.RescaleIntercept, ds.RescaleSlope, ds.Manufacturer = "-1024", "1", "naive"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 512, 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        image = Image.new("L", (512, 512), 0)
        draw = ImageDraw.Draw(image)
        lines = [
            "SYNTHETIC - NOT FOR CLINICAL USE",
            "Patient: Doe, John  ID: PID1",
            "Accession: 2026AB0000001",
            f"Study UID: {study}",
            f"Series UID: {series}",
            f"Image {index + 1}",
            f"SOP UID: {sop}",
        ]
        for row, line in enumerate(lines):
            draw.text((8, 8 + 19 * row), line, font=font, fill=255)
        radius = 40 + index % 60
        draw.ellipse((256 - radius, 300 - radius, 256 + radius, 300 + radius), fill=200)
        ds.PixelData = (np.asarray(image).astype(np.uint16) * 16).tobytes()
        path = work / f"{index:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        total += path.stat().st_size
    return {"instances": slices, "bytes": total, "seconds": time.perf_counter() - started}


def _disk(files: int, work: Path) -> dict[str, Any]:
    data = os.urandom(525_000)  # a 512×512 16-bit slice with its header
    started = time.perf_counter()
    for index in range(files):
        fd = os.open(work / f"{index}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"instances": files, "bytes": files * len(data), "seconds": time.perf_counter() - started}


def run_case(name: str, count: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fabricatord-bench-{name}-", dir=ROOT / "var" / "bench"))
    try:
        if name in ("ct", "ct-big"):
            result = _generate("CT", count, work)
        elif name == "cr":
            result = _generate("CR", 0, work)
        elif name == "naive":
            result = _naive(count, work)
        else:
            result = _disk(count, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def measure(name: str, count: int, repeat: int) -> dict[str, Any]:
    """Median of `repeat` runs, each in a process of its own."""
    runs = []
    for _ in range(repeat):
        output = subprocess.run(
            [sys.executable, __file__, "--case", name, "--count", str(count)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(r["seconds"] for r in runs)
    instances, size = runs[0]["instances"], runs[0]["bytes"]
    return {
        "case": name,
        "instances": instances,
        "mb": round(size / 1e6, 1),
        "seconds": round(seconds, 3),
        "instances_per_s": round(instances / seconds, 1),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "runs": [round(r["seconds"], 3) for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    (ROOT / "var" / "bench").mkdir(parents=True, exist_ok=True)
    if args.case:
        print(json.dumps(run_case(args.case, args.count)))
        return 0

    rows = [
        measure("ct", args.slices, args.repeat),
        measure("naive", args.slices, args.repeat),
        measure("disk", args.slices, args.repeat),
        measure("cr", 2, args.repeat),
        measure("ct-big", args.big, 1),
    ]
    by_case = {row["case"]: row for row in rows}
    ct, naive, disk, big = by_case["ct"], by_case["naive"], by_case["disk"], by_case["ct-big"]
    ratios = {
        "ct_vs_naive": round(ct["instances_per_s"] / naive["instances_per_s"], 2),
        "ct_mb_per_s_vs_disk": round(ct["mb_per_s"] / disk["mb_per_s"], 2),
        "ct_big_rss_vs_ct_rss": round(big["peak_rss_mb"] / ct["peak_rss_mb"], 2),
    }
    goals = {
        f"ct >= {GOAL_SLICES_PER_SECOND} slices/s": ct["instances_per_s"] >= GOAL_SLICES_PER_SECOND,
        f"ct >= {GOAL_RATIO_TO_NAIVE}x naive": ratios["ct_vs_naive"] >= GOAL_RATIO_TO_NAIVE,
        "memory flat (big/ct peak RSS <= 1.25)": ratios["ct_big_rss_vs_ct_rss"] <= 1.25,
    }
    print(f"{'case':<8} {'instances':>9} {'MB':>8} {'seconds':>8} {'inst/s':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    for row in rows:
        print(
            f"{row['case']:<8} {row['instances']:>9} {row['mb']:>8} {row['seconds']:>8} "
            f"{row['instances_per_s']:>8} {row['mb_per_s']:>8} {row['peak_rss_mb']:>12}"
        )
    print()
    for key, value in ratios.items():
        print(f"{key:<24} {value}")
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    report = {
        "benchmark": "generate",
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
        "ratios": ratios,
        "goals": goals,
    }
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
