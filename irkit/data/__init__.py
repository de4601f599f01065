"""Dataset loaders: revisitop layout, revisitop1m distractors, user collections, labelled images, GLDv2."""
from irkit.data.collection import Collection, load_collection
from irkit.data.distractors import DistractorSet, combined_database, load_distractors
from irkit.data.labelled import LabelledImages, load_labelled
from irkit.data.revisitop import RevisitopDataset, load_gnd, load_revisitop

__all__ = ["Collection", "load_collection", "DistractorSet", "combined_database", "load_distractors",
           "LabelledImages", "load_labelled", "RevisitopDataset", "load_gnd", "load_revisitop"]
