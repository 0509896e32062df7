"""mmaccel.passes."""
