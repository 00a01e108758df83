"""Small helpers every package may use: durable files (:mod:`common.files`), images (:mod:`common.images`) and
line charts (:mod:`common.plots`). They import no other package of the project, so they sit below all of them."""
