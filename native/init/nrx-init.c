/* placeholder: replaced by the sandbox init (issue 2) */
int main(void) { return 0; }
