"""The menu action: Tools > Scripts > Generative Fill runs the docker's Fill."""

from __future__ import annotations

from krita import Extension, Krita
from PyQt5.QtWidgets import QDockWidget

from .docker import DOCKER_ID

ACTION_ID = "genfill_fill"


class GenfillExtension(Extension):
    def setup(self) -> None:
        pass

    def createActions(self, window) -> None:  # noqa: N802 - Krita's name
        action = window.createAction(ACTION_ID, "Generative Fill", "tools/scripts")
        # Not the ``window`` given here: Krita deletes that wrapper once createActions returns.
        action.triggered.connect(lambda: fill_in(Krita.instance().activeWindow()))


def find_docker(window):
    """The window's Generative Fill docker (Krita makes one per window)."""
    from .docker import GenfillDocker

    # Krita 5.1's Window has no dockers(); the docker is a child of the window's QMainWindow.
    for docker in window.qwindow().findChildren(QDockWidget):
        if isinstance(docker, GenfillDocker) or docker.objectName() == DOCKER_ID:
            return docker
    return None


def fill_in(window) -> None:
    docker = find_docker(window) if window is not None else None
    if docker is None:
        return
    docker.show()
    docker.raise_()
    docker.fill()
