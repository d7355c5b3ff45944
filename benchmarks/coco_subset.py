"""Write the COCO annotation file of a subset of images, named by a list of file stems (e.g. a VOC split list).

    python benchmarks/coco_subset.py --annotations bccd/annotations.json --stems bccd/splits/train.txt \\
        --output outputs/bccd_splits/train.json

The images stay where they are: the subset file references the same ``file_name``s, so it pairs with the
original image folder (``--train_images bccd/images --train_annotations outputs/bccd_splits/train.json``).
Categories, ``info`` and ``licenses`` are kept; ids are unchanged. A stem with no image is an error.
"""

import argparse
import json
import os
from pathlib import Path


def read_stems(path: str) -> list[str]:
    """One file stem per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def coco_subset(coco: dict, stems: list[str]) -> dict:
    """The images whose ``file_name`` without extension is in ``stems``, with their annotations, in file order."""
    wanted = set(stems)
    images = [image for image in coco["images"] if os.path.splitext(image["file_name"])[0] in wanted]
    missing = wanted - {os.path.splitext(image["file_name"])[0] for image in images}
    if missing:
        raise ValueError(f"{len(missing)} stem(s) name no image of the annotation file, e.g. {sorted(missing)[:3]}")
    ids = {image["id"] for image in images}
    annotations = [annotation for annotation in coco["annotations"] if annotation["image_id"] in ids]
    return {**coco, "images": images, "annotations": annotations}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO instances json of all images")
    parser.add_argument("--stems", required=True, help="text file, one image file stem per line")
    parser.add_argument("--output", required=True, help="where to write the subset json")
    args = parser.parse_args(argv)
    subset = coco_subset(json.loads(Path(args.annotations).read_text()), read_stems(args.stems))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(subset))
    print(f"{args.output}: {len(subset['images'])} images, {len(subset['annotations'])} boxes")


if __name__ == "__main__":
    main()
