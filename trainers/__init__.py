"""Trainers that produce real LCSC trajectories on scikit-learn's 8x8 digits.

Each trainer is ordinary training code that uses lcsc_fast the way a user's would: a Recorder
saves a snapshot every `every` steps beside a standard EMA model. Run one from the command line:

    python -m lcsc_fast.trainers.dm --out runs/dm          # EDM diffusion model
    python -m lcsc_fast.trainers.ct --out runs/ct          # consistency training (iCT-style)
    python -m lcsc_fast.trainers.cd --teacher runs/dm --out runs/cd    # consistency distillation
    python -m lcsc_fast.trainers.ect --teacher runs/dm --out runs/ect  # consistency tuning (ECT)

The sources live in the repository's trainers/ folder and install as lcsc_fast.trainers.
"""
