"""Built-in tfreg methods. Each subpackage registers through the ``tfreg.methods`` entry point
group exactly like a third-party plugin; nothing here is special-cased by the core."""
