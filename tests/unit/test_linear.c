/* placeholder: replaced by the linear kernel tests */
int main(void) {
    return 0;
}
