"""The OpenMementos data pipeline: plain reasoning traces -> memento traces."""
