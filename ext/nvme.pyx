# placeholder, replaced by the real kernel
