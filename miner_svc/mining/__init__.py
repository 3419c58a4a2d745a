"""Mining: a labelled dataset, a head and a detector -> one recipe per class.

    job.py         the mining job: detect on the ImagePool, split, mine each class, summarise
    miner.py       Miner.mine_class: prompts, set cover, gate sweep, expansion, evaluation
    selection.py   counts, the one objective, the vectorised gate sweep, image-level metrics
    settings.py    MiningSettings (with the BackgroundPolicy), checked
    report.py      the recipe's summary, the run summary's class lines, the veto log line
    negatives.py   hard negatives: kept per job, exported as a small YOLO dataset
    benchmark.py   the A/B benchmark of the background veto
"""
