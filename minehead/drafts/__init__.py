"""Draft output: the folder layout (YOLO labels, COCO, Label Studio, review queue) written one
image at a time, shared by the miner's drafting job and the CLI's streaming mode."""
