"""Model-card templates shipped inside the installed package (filled by the export layer)."""
