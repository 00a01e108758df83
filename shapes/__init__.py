"""The synthetic "shapes" world the shipped model is trained on and measured in: scenes, captions and the prompt
grammar (:mod:`shapes.world`), the dataset writer (:mod:`shapes.make_dataset`) and the reader that gets an image's
colour, shape and position back from its pixels (:mod:`shapes.analysis`). It imports only :mod:`common`, so
training, evaluation and the recipes can all use it."""
