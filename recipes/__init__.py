"""Recipes: a model made end to end with the project's own commands (``recipes/shapes.sh``, the shipped model), and
the recipe's own steps (the shipped folder, its model card and the card's measurements). Recipes sit above
training and evaluation and use both."""
