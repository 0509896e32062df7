"""mmaccel.compiler."""
