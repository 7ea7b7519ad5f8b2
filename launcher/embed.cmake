# embed.cmake: writes OUT, a C file defining the string NAME with the text of the file
# IN (cmake -DNAME=... -DIN=... -DOUT=... -P embed.cmake). Used for the sbatch templates
# of `spar submit`, so that the program carries them wherever it is installed.
file(READ "${IN}" text)
string(REPLACE "\\" "\\\\" text "${text}")
string(REPLACE "\"" "\\\"" text "${text}")
string(REPLACE "\n" "\\n\"\n    \"" text "${text}")
file(WRITE "${OUT}.tmp" "/* generated from ${IN} by launcher/embed.cmake */\nconst char ${NAME}[] =\n    \"${text}\";\n")
configure_file("${OUT}.tmp" "${OUT}" COPYONLY)
