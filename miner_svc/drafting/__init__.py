"""Drafting, the product's last step: a recipe set over a folder of new images, written as a
draft folder annotation tools open (`job.py`). One image's drafting is `recipes.drafter`, which
the ImagePool runs wherever the work runs."""
